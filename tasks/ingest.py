import csv
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact

from tasks.dvc_stage import read_json, retry_transient_only, run_stage


@task(name="ingest", retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient_only)
def ingest(workdir: str) -> dict:
    """Validate and shard the annotated images (and make the sample data first if it is used)."""
    ran = run_stage("ingest", workdir, with_upstream=True)
    s = read_json(workdir, "reports/ingest.json")
    with (Path(workdir) / s["issues_report"]).open(newline="", encoding="utf-8") as f:
        issues = list(csv.DictReader(f))
    lines = [f"| {i['record']} | `{i['image']}` | {i['reason']} |" for i in issues[:20]]
    md = (f"## Dataset\n\n| records | accepted | rejected | negatives | train | val | test |\n|---|---|---|---|---|---|---|\n"
          f"| {s['records']} | {s['accepted']} | {s['rejected']} | {s['negatives']} | {s['splits']['train']} "
          f"| {s['splits']['val']} | {s['splits']['test']} |\n\ndata version `{s['data_version']}`\n")
    if issues:
        md += (f"\n### Rejected records ({len(issues)}; full list in `{s['issues_report']}`)\n\n"
               "| record | image | reason |\n|---|---|---|\n" + "\n".join(lines) + "\n")
    if s.get("label_warnings"):
        md += "\n### Label warnings\n\n" + "\n".join(f"- {w}" for w in s["label_warnings"]) + "\n"
    create_markdown_artifact(key="dataset-summary", markdown=md, description="ingest: images accepted and rejected")
    return {**s, "ran": ran}
