import csv
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.dvc_stage import read_json, retry_transient_only, run_stage

SHOWN = ["map", "micro_f1", "macro_f1", "micro_precision", "micro_recall", "hamming_loss", "subset_accuracy"]


@task(name="evaluate", retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient_only)
def evaluate(workdir: str) -> dict:
    """Tune per-label thresholds on validation and score the test split."""
    ran = run_stage("evaluate", workdir)
    metrics = read_json(workdir, "reports/metrics.json")
    t = metrics["test"]
    create_markdown_artifact(
        key="test-metrics", description="test metrics at the tuned thresholds",
        markdown=f"## Test metrics ({t['images']} images)\n\n| metric | value |\n|---|---|\n"
                 + "\n".join(f"| {k} | {t[k]:.4f} |" for k in SHOWN if t.get(k) is not None) + "\n")
    with (Path(workdir) / "reports/per_label.csv").open(newline="") as f:
        create_table_artifact(key="per-label-metrics", table=list(csv.DictReader(f)),
                              description="test AP, F1, threshold and support per label")
    return {**metrics, "ran": ran}
