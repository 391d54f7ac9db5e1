from prefect import task
from prefect.artifacts import create_table_artifact

from tasks.dvc_stage import read_json, retry_transient_only, run_stage


@task(name="labels", retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient_only)
def labels(workdir: str) -> dict:
    """Label vocabulary, multi-hot targets and label statistics."""
    ran = run_stage("labels", workdir)
    stats = read_json(workdir, "reports/label_stats.json")
    by_split = stats["frequency_by_split"]
    create_table_artifact(
        key="label-statistics", description="images per label, by split",
        table=[{"label": label, "images": n, **{s: by_split[s][label] for s in by_split}}
               for label, n in stats["frequency"].items()])
    return {**read_json(workdir, "reports/labels.json"), "ran": ran}
