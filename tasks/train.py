import csv
from pathlib import Path

from prefect import task
from prefect.artifacts import create_table_artifact

from tasks.dvc_stage import read_json, retry_transient_only, run_stage


@task(name="train", retries=1, retry_delay_seconds=10, retry_condition_fn=retry_transient_only)
def train(workdir: str) -> dict:
    """Train the classifier (resumes from its last checkpoint if a previous attempt was cut off)."""
    ran = run_stage("train", workdir)
    with (Path(workdir) / "reports/train_history.csv").open(newline="") as f:
        history = list(csv.DictReader(f))
    create_table_artifact(key="training-curve", table=history, description="loss and validation mAP per epoch")
    return {**read_json(workdir, "reports/train.json"), "ran": ran}
