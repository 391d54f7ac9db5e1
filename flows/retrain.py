"""The `retrain` flow: take in new inbox batches, version the raw data with DVC, and when enough new
images arrived run the training pipeline as a subflow (fine-tuning from the champion when the
labels are unchanged), then commit dvc.lock, the raw data's .dvc file and params.yaml to git.

Deployed on a schedule by `multitag deploy` / `multitag serve` (infra/prefect.yaml for `prefect
deploy`), with a concurrency limit of 1; a workspace lock also keeps hand-started runs apart.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows.pipeline import training_pipeline
from multitag.config import load_params
from multitag.lineage import (commit_message, commit_paths, load_state, plan, raw_ingest_params, retrain_lock,
                              save_state, state_path, take_in, update_params)
from tasks.dvc import dvc_add, retry_transient_only


def _run_name() -> str:
    workdir = Path(flow_run.parameters.get("workdir", ".")).resolve().name
    return f"retrain-{workdir}-{datetime.now():%Y%m%d-%H%M%S}"


def _table(rows) -> str:
    return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n"


@task(name="take-in-batches", retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient_only)
def take_in_batches(workdir: str) -> dict:
    """Apply complete inbox batches to the raw data; archive them, or reject unusable ones."""
    ws = Path(workdir)
    intake = take_in(load_params(ws / "params.yaml"), ws)
    md = f"## Inbox\n\n{len(intake['applied'])} batch(es) taken in, {len(intake['rejected'])} rejected\n\n"
    if intake["applied"]:
        md += ("| batch | records | images added | relabelled | duplicates | records rejected | new labels |\n"
               "|---|---|---|---|---|---|---|\n")
        md += "".join(f"| {e['batch']} | {e['records']} | {e['added']} | {len(e['relabelled'])} | {e['duplicates']} "
                      f"| {len(e['rejected'])} | {', '.join(e['new_labels']) or '-'} |\n" for e in intake["applied"])
    problems = [(e["batch"], r) for e in intake["applied"] for r in e["rejected"]]
    if problems:
        md += ("\n### Rejected records\n\n| batch | record | image | reason |\n|---|---|---|---|\n"
               + "".join(f"| {b} | {r['record']} | `{r['image']}` | {r['reason']} |\n" for b, r in problems[:50]))
    relabelled = [(e["batch"], r) for e in intake["applied"] for r in e["relabelled"]]
    if relabelled:
        md += ("\n### Labels changed for known images\n\n| batch | image | before | after |\n|---|---|---|---|\n"
               + "".join(f"| {b} | `{r['image']}` | {' '.join(r['before'])} | {' '.join(r['after'])} |\n"
                         for b, r in relabelled[:50]))
    if intake["rejected"]:
        md += ("\n### Rejected batches\n\n| batch | reason |\n|---|---|\n"
               + "".join(f"| {r['batch']} | {r['reason']} |\n" for r in intake["rejected"]))
    create_markdown_artifact(key="inbox-batches", markdown=md, description="retrain: batches taken in from the inbox")
    return intake


@task(name="commit")
def commit(workdir: str, raw: str, message: str) -> str | None:
    sha = commit_paths(Path(workdir), ["dvc.lock", f"{raw}.dvc", "params.yaml",
                                       str(Path(raw).parent / ".gitignore")], message)
    get_run_logger().info("git commit %s: %s", sha or "skipped (not a git repository, or nothing changed)", message)
    return sha


@flow(name="retrain", flow_run_name=_run_name)
def retrain(workdir: str = ".", force: bool = False) -> dict:
    """Take in new batches and retrain when at least retrain.min_new_images arrived (or ``force``)."""
    logger = get_run_logger()
    ws = Path(workdir).resolve()
    with retrain_lock(ws):
        params = load_params(ws / "params.yaml")
        raw = params.retrain.raw.rstrip("/")
        intake = take_in_batches(str(ws))
        state_file = state_path(params, ws)
        state = load_state(state_file)
        if intake["batches"]:
            update_params(ws / "params.yaml", {"ingest": raw_ingest_params(params)})
            if state["versioned"] != intake["batches"]:
                dvc_add(str(ws), raw)
                save_state(state_file, {**state, "versioned": intake["batches"]})
        decision = plan(load_params(ws / "params.yaml"), ws, force)
        logger.info("%s", decision["reason"])
        result = None
        if decision["train"]:
            update_params(ws / "params.yaml", {"train": {"init_from": decision["init_from"]}})
            result = training_pipeline(workdir=str(ws))
        sha = None
        if intake["applied"] or result is not None:
            sha = commit(str(ws), raw, commit_message(decision, result))
        if result is not None:  # after the commit: a run stopped before it trains (DVC skips all) and commits again
            save_state(state_file, {**load_state(state_file), "trained": intake["batches"]})
        summary = {"batches_taken_in": [e["batch"] for e in intake["applied"]],
                   "batches_rejected": [r["batch"] for r in intake["rejected"]],
                   **{k: decision[k] for k in ("new_images", "new_labels", "reason", "init_from", "champion",
                                               "champion_map")},
                   "trained": result is not None, "pipeline": result, "git_commit": sha}
        create_markdown_artifact(key="retrain-summary", markdown=summary_markdown(summary),
                                 description="retrain: what arrived, what was trained, what was promoted")
        return summary


def summary_markdown(s: dict) -> str:
    rows = [("batches taken in", ", ".join(s["batches_taken_in"]) or "none"),
            ("batches rejected", ", ".join(s["batches_rejected"]) or "none"),
            ("new or relabelled images", s["new_images"]),
            ("new labels", ", ".join(s["new_labels"]) or "none"),
            ("decision", s["reason"])]
    r = s["pipeline"]
    if r:
        champ = s["champion_map"]
        change = f" (champion v{s['champion']}: {champ:.4f}, change {r['test_map'] - champ:+.4f})" if champ is not None else ""
        rows += [("test mAP", f"{r['test_map']:.4f}{change}"), ("micro-F1", f"{r['micro_f1']:.4f}"),
                 ("macro-F1", f"{r['macro_f1']:.4f}"), ("Hamming loss", f"{r['hamming_loss']:.4f}"),
                 ("registered", f"v{r['version']}" + ("" if r["new_version"] else " (already registered)")),
                 ("promoted", f"{'yes' if r['champion'] else 'no'}: {r['reason']}")]
    rows.append(("git commit", s["git_commit"] or "none"))
    return "## Retrain\n\n" + _table(rows)
