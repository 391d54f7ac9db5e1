"""One Prefect task for every pipeline stage: run it through DVC, then publish what it produced as
Prefect artifacts. Adding a stage is one entry in ``RENDERERS``: a function that reads the stage's
outputs (paths from multitag/layout.py), creates its artifacts and returns a small summary."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from multitag.config import load_params
from multitag.errors import NotFound
from multitag.layout import BATCH_CHECKS, Layout
from multitag.report import markdown_table, read_csv_rows, read_json
from multitag.registry import CHAMPION, Registry
from multitag.storage import open_store
from tasks.dvc import retry_transient_only, run_stage
from tasks.pictures import ap_per_label, batch_scores, drawn, model_history, picture, training_curve, tune_history

SHOWN_METRICS = ["map", "micro_f1", "macro_f1", "micro_precision", "micro_recall", "hamming_loss", "subset_accuracy"]


def render_sample(ws: Layout) -> dict:
    return {}  # the built-in sample data: nothing to show beyond the run's log


def render_ingest(ws: Layout) -> dict:
    s = read_json(ws.ingest_summary)
    issues = read_csv_rows(ws.root / s["issues_report"])
    md = "## Dataset\n\n" + markdown_table(
        [[s["records"], s["accepted"], s["rejected"], s["negatives"], *s["splits"].values()]],
        ["records", "accepted", "rejected", "negatives", *s["splits"]]) + f"\ndata version `{s['data_version']}`\n"
    if issues:
        md += (f"\n### Rejected records ({len(issues)}; full list in `{s['issues_report']}`)\n\n"
               + markdown_table([(i["record"], f"`{i['image']}`", i["reason"]) for i in issues[:20]],
                                ["record", "image", "reason"]))
    if s.get("label_warnings"):
        md += "\n### Label warnings\n\n" + "\n".join(f"- {w}" for w in s["label_warnings"]) + "\n"
    create_markdown_artifact(key="dataset-summary", markdown=md, description="ingest: images accepted and rejected")
    return s


def render_labels(ws: Layout) -> dict:
    stats = read_json(ws.label_stats)
    by_split = stats["frequency_by_split"]
    create_table_artifact(
        key="label-statistics", description="images per label, by split (every label)",
        table=[{"label": label, "images": n, **{s: by_split[s][label] for s in by_split}}
               for label, n in sorted(stats["frequency"].items(), key=lambda kv: -kv[1])])
    if stats["pairs"]:
        create_table_artifact(key="label-pairs", table=stats["pairs"],
                              description="labels that appear together most (cosine n_ab / sqrt(n_a n_b)), with P(b|a), P(a|b), lift")
    create_markdown_artifact(key="label-plots", description="label frequencies and co-occurrence (the label-statistics "
                                                            "and label-pairs tables as a picture)",
                             markdown="## Labels\n\n" + picture(ws.label_stats_plot, "label statistics"))
    return read_json(ws.labels_summary)


def render_train(ws: Layout) -> dict:
    history = read_csv_rows(ws.train_history)
    create_table_artifact(key="training-curve", table=history, description="loss and validation mAP per epoch")
    create_markdown_artifact(key="training-curve-plot", description="loss, validation mAP and learning rate per epoch",
                             markdown="## Training curve\n\n" + drawn(training_curve, history))
    return read_json(ws.train_summary)


def render_evaluate(ws: Layout) -> dict:
    metrics = read_json(ws.metrics)
    t = metrics["test"]
    buckets = metrics.get("buckets", {})
    create_markdown_artifact(
        key="test-metrics", description="test metrics at the tuned thresholds",
        markdown=f"## Test metrics ({t['images']} images)\n\n"
                 + markdown_table([(k, t[k]) for k in SHOWN_METRICS if t.get(k) is not None], ["metric", "value"])
                 + "\n### By label frequency in training (thirds of the labels)\n\n"
                 + markdown_table([(name, b["labels"], b["map"], b["micro_f1"], b["recall"]) for name, b in buckets.items()],
                                  ["labels", "count", "mAP", "micro-F1", "recall"]))
    per_label = read_csv_rows(ws.per_label)
    create_table_artifact(key="per-label-metrics", table=per_label,
                          description="every label: test support, training images, bucket, AP, F1, threshold")
    create_markdown_artifact(key="evaluation-plots", description="AP per label, sorted, and precision-recall curves",
                             markdown="## AP per label\n\n" + drawn(ap_per_label, per_label)
                                      + "\n## Precision-recall\n\n" + picture(ws.pr_plot, "precision-recall curves"))
    return metrics


def render_register(ws: Layout) -> dict:
    r = read_json(ws.registration)
    store = open_store(r["store"], ws.root)
    url = store.url(f"registry/{r['name']}/versions/{r['version']:06d}")
    previous = f"v{r['previous_champion']}" if r["previous_champion"] else "none"
    create_markdown_artifact(
        key="registry-entry", description="registered model version and promotion decision",
        markdown=f"## {r['name']} v{r['version']}\n\n" + markdown_table([
            ("version", "new" if r["created"] else "weights already registered"),
            ("champion", f"**{'yes' if r['champion'] else 'no'}** (previous champion: {previous})"),
            ("reason", r["reason"]), ("test mAP", r["test_map"]), ("location", f"[{url}]({url})")]))
    create_markdown_artifact(
        key="promotion-decision", description="whether this version became the champion, and why",
        markdown=(f"## {'Promoted' if r['champion'] else 'Not promoted'}: {r['name']} v{r['version']}\n\n"
                  f"{r['reason']}\n\nchampion before: {previous}\n"))
    registry = Registry(store, r["name"])
    try:
        card = store.get_bytes(registry.version_key(r["version"], "MODEL_CARD.md"))[0].decode()
    except NotFound:  # DVC restored this report from its cache into a store emptied since (make clean)
        card = (f"*{r['name']} v{r['version']} is not in the store {store.uri}: DVC restored the register stage's "
                "report from its cache; `dvc repro -f register` registers the model again*\n")
    create_markdown_artifact(key="model-card", description=f"{r['name']} v{r['version']}: MODEL_CARD.md in the store",
                             markdown=card)
    history = history_rows(registry)
    markdown = ("## Model history\n\n" + drawn(model_history, history) + "\n"
                + markdown_table([[("yes" if v is True else "no" if v is False else v) for v in h.values()]
                                  for h in history], HISTORY_COLUMNS))
    checks = ws.root / load_params(ws.params).retrain.raw / BATCH_CHECKS  # kept by the retrain flow
    if checks.exists():
        rows = read_csv_rows(checks)
        markdown += ("\n## The champion on each new batch\n\n" + drawn(batch_scores, rows) + "\n" + markdown_table(
            [[r[k] for k in ("batch", "champion", "images", "batch_map", "test_map", "drop", "flagged")] for r in rows],
            ["batch", "champion", "images", "mAP on the batch", "test mAP", "drop", "flagged"]))
    create_markdown_artifact(key="model-history", markdown=markdown,
                             description="every registered version's test mAP, the champion, its score on new batches")
    return {**r, "url": url, "store": store.uri}


HISTORY_COLUMNS = ["version", "created", "data version", "test mAP", "promoted", "champion", "champion mAP"]


def history_rows(registry: Registry) -> list[dict]:
    """Each registered version: when, on which data, its test mAP, whether it became the champion,
    and the champion's test mAP once it was registered. (Test mAPs of versions trained on other data
    were scored on other test sets: the data version says which.)"""
    alias = registry.alias(CHAMPION)
    lineage = alias[0].get("lineage", []) if alias else []
    scores, rows = {}, []
    for v in registry.versions():
        scores[v["version"]] = v["test_map"]
        champion = max((c for c in lineage if c <= v["version"]), default=None)
        rows.append({"version": v["version"], "created": v["created_at"][:19],
                     "data version": registry.card(v["version"]).get("data_version"), "test mAP": v["test_map"],
                     "promoted": v["version"] in lineage, "champion": f"v{champion}" if champion else "",
                     "champion mAP": scores.get(champion)})
    return rows


def render_review(ws: Layout) -> dict:
    summary = read_json(ws.review_summary)
    if summary["enabled"]:
        rows = read_csv_rows(ws.label_issues)
        create_table_artifact(key="label-issues", table=[{k: r[k] for k in ("image", "given", "likely_missing",
                                                                          "likely_extra", "quality", "chance", "flagged")}
                                                         for r in rows[:200]],
                              description=f"label review: the 200 least likely annotations of {len(rows)}; "
                                          f"{summary['flagged']} flagged (all in {ws.label_issues.name}; the "
                                          f"share expected to hold a wrong label: "
                                          f"{summary['expected_precision']}); the fold models' held-out mAP "
                                          f"{summary['heldout_map']}")
        create_markdown_artifact(key="label-review-sheet", description="the most suspect annotations, as images",
                                 markdown="## Label review\n\n" + picture(ws.label_issues_plot, "label review"))
    return summary


RENDERERS = {"sample": render_sample, "ingest": render_ingest, "labels": render_labels, "train": render_train,
             "evaluate": render_evaluate, "register": render_register, "review": render_review}
# -- the retrain flow's artifacts (flows/retrain.py) -------------------------------------------------

def inbox_markdown(intake: dict) -> str:
    """The inbox-batches artifact: batches taken in, their rejected records and relabelled images."""
    md = f"## Inbox\n\n{len(intake['applied'])} batch(es) taken in, {len(intake['rejected'])} rejected\n\n"
    if intake["applied"]:
        md += markdown_table([(e["batch"], e["records"], e["added"], len(e["relabelled"]), e["duplicates"],
                               len(e["rejected"]), ", ".join(e["new_labels"]) or "-") for e in intake["applied"]],
                             ["batch", "records", "images added", "relabelled", "duplicates", "records rejected",
                              "labels new to the raw data"])
    problems = [(e["batch"], r["record"], f"`{r['image']}`", r["reason"]) for e in intake["applied"] for r in e["rejected"]]
    if problems:
        md += "\n### Rejected records\n\n" + markdown_table(problems[:50], ["batch", "record", "image", "reason"])
    relabelled = [(e["batch"], f"`{r['image']}`", " ".join(r["before"]), " ".join(r["after"]))
                  for e in intake["applied"] for r in e["relabelled"]]
    if relabelled:
        md += "\n### Labels changed for known images\n\n" + markdown_table(relabelled[:50],
                                                                            ["batch", "image", "before", "after"])
    if intake["rejected"]:
        md += "\n### Rejected batches\n\n" + markdown_table([(r["batch"], r["reason"]) for r in intake["rejected"]],
                                                             ["batch", "reason"])
    return md


def batch_check_markdown(checks: list[dict]) -> str:
    """The batch-check artifact: the champion on each new batch, with its verdict."""
    rows = [(c["batch"], c["images"], c.get("champion", "-"), c.get("batch_map", "-"), c.get("test_map", "-"),
             c.get("drop", "-"), c.get("batch_micro_f1", "-"), " ".join(c.get("new_labels", [])) or "-",
             ", ".join(f"{s['label']} {s['change']:+.2f}" for s in c.get("largest_shifts", [])) or "-",
             "**FLAGGED**" if c.get("flagged") else c.get("reason", "ok")) for c in checks]
    return "## The champion on the new batches\n\n" + markdown_table(rows, [
            "batch", "images", "champion", "mAP on the batch", "test mAP", "drop", "micro-F1 on the batch",
            "labels new to it", "largest label shifts vs its training data", "verdict"])


def retrain_markdown(s: dict) -> str:
    """The retrain-summary artifact: the same facts as the commit message, in a table."""
    rows = [("batches taken in", ", ".join(s["batches_taken_in"]) or "none"),
            ("batches rejected", ", ".join(s["batches_rejected"]) or "none"),
            ("new or relabelled images", s["new_images"]),
            ("labels", f"{s['labels']} ({len(s['new_labels'])} new to the champion: {', '.join(s['new_labels'][:20])})"
             if s["new_labels"] else f"{s['labels']} (none new to the champion)"),
            ("decision", s["reason"])]
    r = s["pipeline"]
    if r:
        champ = r.get("champion_map")
        change = (f" (champion v{r['previous_champion']} on the same test set: {champ:.4f}, change "
                  f"{r['compared_map'] - champ:+.4f})" if champ is not None else "")
        rows += [("test mAP", f"{r['test_map']:.4f}{change}"), ("micro-F1", r["micro_f1"]),
                 ("macro-F1", r["macro_f1"]), ("Hamming loss", r["hamming_loss"]),
                 ("registered", f"v{r['version']}" + ("" if r["new_version"] else " (already registered)")),
                 ("promoted", f"{'yes' if r['champion'] else 'no'}: {r['reason']}")]
    rows += [("git commit", s["git_commit"] or "none"), ("commit message", s["commit_message"])]
    return "## Retrain\n\n" + markdown_table(rows, ["", ""])


@task(retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient_only)
def stage(name: str, workdir: str) -> dict:
    """Run one dvc.yaml stage through DVC and publish its artifacts; returns its summary and
    whether it ran (False: DVC found it up to date)."""
    ran = run_stage(name, workdir)
    return {**RENDERERS[name](Layout(workdir)), "ran": ran}


def stage_task(name: str):
    """The stage task named after its stage (training is retried once at most: it is long)."""
    return stage.with_options(name=name, retries=1 if name == "train" else 2)


# -- the tune flow's artifact (flows/tune.py) --------------------------------------------------------

def tune_markdown(t) -> str:
    """The tune-study artifact: baseline and best trial (test mAP once each, at the end), the
    optimisation history, every trial with its recipe, the importances and the params.yaml diff."""
    b = t.baseline
    md = (f"## Tune: study {t.study}\n\n"
          + markdown_table([("the workspace's recipe (baseline)", b.get("val_map", "-"), b.get("test_map", "-")),
                            (f"best trial {t.best['number']}" if t.best else "best trial: none finished yet",
                             t.best["val_map"] if t.best else "-", (t.best or {}).get("test_map", "-"))],
                           ["", "val mAP", "test mAP (scored once, at the end)"])
          + "\n" + drawn(tune_history, t.trials))
    md += "\n### Trials\n\n" + markdown_table(
        [(tr["number"], tr["state"], tr["val_map"] if tr["val_map"] is not None else tr["last_val_map"] or "-",
          tr["epochs"] or "-", ", ".join(f"{k} {v}" for k, v in tr["recipe"].items() if k != "trial_s"), tr["note"] or "")
         for tr in t.trials], ["trial", "state", "val mAP (pruned: best reached)", "epochs", "recipe", "note"])
    if t.importances:
        md += "\n### Parameter importances (Optuna's PED-ANOVA)\n\n" + markdown_table(list(t.importances.items()),
                                                                           ["parameter", "importance"])
    md += ("\n### params.yaml, tuned\n\n```diff\n" + t.diff + "```\n" if t.diff else
           "\n*No trial beat the workspace's recipe by `tune.min_gain` or more: params.yaml needs no change.*\n")
    return md
