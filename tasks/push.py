from prefect import task

from tasks.dvc_stage import StageFailed, run_dvc


@task(name="push", retries=3, retry_delay_seconds=15)
def push(workdir: str) -> dict:
    """`dvc push` the run's data and models to the default DVC remote, if one is configured.
    Retried on any failure: pushing is idempotent I/O (content-addressed uploads)."""
    code, lines = run_dvc(["remote", "default"], workdir)
    if code != 0 or not lines:
        return {"pushed": False, "remote": None}
    remote = lines[-1].strip()
    code, out = run_dvc(["push", "--remote", remote], workdir)
    if code != 0:
        raise StageFailed(f"dvc push to remote {remote!r} failed:\n" + "\n".join(out[-10:]))
    return {"pushed": True, "remote": remote}
