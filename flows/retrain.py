"""The `retrain` flow: take in new inbox batches (the first time, with the data set params.yaml's
ingest reads as batch "origin"), version the raw data with DVC, record its hash in lineage.yaml, and
when enough new images arrived run the training pipeline as a subflow (fine-tuning from the champion
when the labels are unchanged), then commit dvc.lock, the raw data's .dvc file and lineage.yaml to git
and push to the DVC remote. params.yaml is never modified.

Deployed on a schedule by `multitag deploy` / `multitag serve` (infra/prefect.yaml for `prefect
deploy`), with a concurrency limit of 1; a workspace lock also keeps hand-started runs apart.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.states import Completed

from flows.alerts import alert
from flows.pipeline import check_code, describe_run, run_name, training_pipeline
from flows.retrain_steps import commit_message, commit_paths, dvc_hash, load_state, plan, retrain_lock, save_state
from multitag.config import load_params
from multitag.drift import check_batch, record
from multitag.inbox import take_in
from multitag.layout import BATCH_CHECKS, ORIGIN, Layout
from multitag.lineage import origin_of, update_lineage
from multitag.rawdata import RawData
from multitag.report import read_csv_rows
from tasks.dvc import dvc_add, push, retry_transient_only
from tasks.pictures import batch_scores, drawn
from tasks.stages import batch_check_markdown, inbox_markdown, retrain_markdown


@task(name="take-in-batches", retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient_only)
def take_in_batches(workdir: str) -> dict:
    """Apply complete inbox batches to the raw data; archive them, or reject unusable ones."""
    ws = Layout(workdir)
    intake = take_in(load_params(ws.params), ws)
    create_markdown_artifact(key="inbox-batches", markdown=inbox_markdown(intake), description="retrain: batches taken in from the inbox")
    return intake


@task(name="check-batches", retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient_only)
def check_batches(workdir: str, batches: list[str]):
    """The champion on each new batch's own labels, before anything is retrained (multitag/drift.py).
    A batch it does much worse on ends this task in the state "Flagged" (with a warning): a retrain
    run goes on, and the UI shows it."""
    ws = Layout(workdir)
    params = load_params(ws.params)
    ledger = {e["batch"]: e for e in RawData(ws.root / params.retrain.raw).ledger()}
    checks = [check_batch(params, ws, ledger[name]) for name in batches]
    record(ws, params, checks)
    history = read_csv_rows(ws.root / params.retrain.raw / BATCH_CHECKS)
    create_markdown_artifact(key="batch-check", description="the champion on each new batch, before retraining",
                             markdown=batch_check_markdown(checks) + "\n## The champion on every batch so far\n\n"
                                      + drawn(batch_scores, history))
    flagged = [c["batch"] for c in checks if c.get("flagged")]
    if flagged:
        message = (f"batch(es) {', '.join(flagged)}: the champion's mAP there is more than retrain.alert_drop below "
                   "its test mAP (see the batch-check artifact)")
        get_run_logger().warning("%s", message)
        alert("multitag.batch.flagged", message, ws.root.name)
        return Completed(name="Flagged", message=message, data=checks)
    return checks


@task(name="commit")
def commit(workdir: str, raw: str, message: str) -> str | None:
    """Commit what the run recorded (only dvc.lock, the raw data's .dvc file and lineage.yaml)."""
    sha = commit_paths(Path(workdir), ["dvc.lock", f"{raw}.dvc", "lineage.yaml"], message)
    get_run_logger().info("git commit %s: %s", sha or "skipped (not a git repository, or nothing changed)", message)
    return sha


@flow(name="retrain", flow_run_name=run_name("retrain"))
def retrain(workdir: str = ".", force: bool = False) -> dict:
    """Take in new batches and retrain when at least retrain.min_new_images arrived (or ``force``)."""
    logger = get_run_logger()
    ws = Layout(Path(workdir).resolve())
    check_code(ws)
    with retrain_lock(ws.root):
        params = load_params(ws.params)
        raw = params.retrain.raw.rstrip("/")
        intake = take_in_batches(str(ws.root))
        new = [e["batch"] for e in intake["applied"] if e["batch"] != ORIGIN]
        if new:
            check_batches(str(ws.root), new)
        if intake["batches"]:  # the raw data exists: version it, and point ingest at it
            dvc_add(str(ws.root), raw)
            params = update_lineage(ws, params, raw=dvc_hash(ws.root / f"{raw}.dvc"), batches=len(intake["batches"]),
                                    origin=params.lineage.origin or origin_of(params.ingest))
        decision = plan(params, ws, force)
        logger.info("%s", decision["reason"])
        result = None
        if decision["train"]:
            update_lineage(ws, params, init_from=decision["init_from"])
            result = training_pipeline(workdir=str(ws.root))
        sha = None
        if intake["applied"] or result is not None:
            sha = commit(str(ws.root), raw, commit_message(decision, result))
        if result is not None:  # after the commit: a run stopped before it trains (DVC skips all) and commits again
            save_state(ws, {**load_state(ws), "trained": intake["batches"]})
        if intake["batches"]:
            push(str(ws.root))
        summary = {"batches_taken_in": [e["batch"] for e in intake["applied"]],
                   "batches_rejected": [r["batch"] for r in intake["rejected"]],
                   **{k: decision[k] for k in ("new_images", "new_labels", "labels", "reason", "init_from", "champion")},
                   "trained": result is not None, "pipeline": result, "git_commit": sha,
                   "commit_message": commit_message(decision, result)}
        create_markdown_artifact(key="retrain-summary", markdown=retrain_markdown(summary),
                                 description="retrain: what arrived, what was trained, what was promoted")
        added = f"+{decision['new_images']} images"
        if result is not None and not result["champion"] and result["previous_champion"] and new:
            behind = result["version"] - result["previous_champion"]
            if behind >= params.retrain.alert_stale_versions:
                alert("multitag.champion.stale", f"{behind} versions registered since champion "
                      f"v{result['previous_champion']}, none promoted, while new data arrived; the last, "
                      f"v{result['version']}: {result['reason']}", ws.root.name)
        if result is None:
            describe_run(f"retrain: not trained ({added})")
        else:
            describe_run(f"retrain v{result['version']} ({added})" + (" champion" if result["champion"] else ""),
                         model=f"v{result['version']}")
        return summary
