from prefect import task
from prefect.artifacts import create_markdown_artifact

from tasks.dvc_stage import read_json, retry_transient_only, run_stage


@task(name="register", retries=3, retry_delay_seconds=10, retry_condition_fn=retry_transient_only)
def register(workdir: str) -> dict:
    """Register the model in the store's registry and apply the champion rule."""
    ran = run_stage("register", workdir)
    r = read_json(workdir, "reports/registration.json")
    create_markdown_artifact(
        key="registry-entry", description="registered model version and promotion decision",
        markdown=(f"## {r['name']} v{r['version']}\n\n"
                  f"- {'new version' if r['created'] else 'weights already registered'}\n"
                  f"- champion: **{'yes' if r['champion'] else 'no'}** "
                  f"(previous champion: {r['previous_champion'] or 'none'})\n"
                  f"- reason: {r['reason']}\n- test mAP: {r['test_map']:.4f}\n- location: [{r['url']}]({r['url']})\n"))
    create_markdown_artifact(
        key="promotion-decision", description="whether this version became the champion, and why",
        markdown=(f"## {'Promoted' if r['champion'] else 'Not promoted'}: {r['name']} v{r['version']}\n\n"
                  f"{r['reason']}\n\nchampion before: {'v' + str(r['previous_champion']) if r['previous_champion'] else 'none'}\n"))
    return {**r, "ran": ran}
