"""Running DVC from Prefect tasks: a stage through `dvc repro` (DVC decides whether it is up to date,
skips it if so, and records the run in dvc.lock), `dvc add`, `dvc push`; DVC's output streams into
the task's Prefect log with secrets masked."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from prefect import get_run_logger, task

from multitag.errors import EXIT_TRANSIENT, StageFailed, StoreUnavailable, TransientStageError
from multitag.logs import redact
from multitag.telemetry import quiet_env


RUNNING: dict[str, str | None] = {"stage": None}  # the stage being run, for the CLI's Ctrl-C message


def retry_transient_only(task, task_run, state) -> bool:
    """Prefect retry_condition_fn: retry a task only when it failed on transient I/O (its stage
    exited with EXIT_TRANSIENT, or the store was unreachable)."""
    try:
        state.result()
    except (TransientStageError, StoreUnavailable):
        return True
    except Exception:
        return False
    return False


def stage_env() -> dict:
    """The environment for DVC and the stage commands it starts: this interpreter's scripts first on
    PATH (so dvc.yaml's `multitag ...` is this install), analytics off."""
    bin_dir = str(Path(sys.executable).parent)
    return {**quiet_env(), "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "PYTHONUNBUFFERED": "1"}


def run_dvc(args: list[str], workdir: str) -> tuple[int, list[str]]:
    """Run ``dvc <args>`` in ``workdir``, streaming its output (secrets masked) into the Prefect log."""
    logger = get_run_logger()
    proc = subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=workdir, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=stage_env())
    lines = []
    for line in proc.stdout:
        line = redact(line.rstrip())
        if line:
            lines.append(line)
            logger.info(line)
    return proc.wait(), lines


_STAGE_ERROR = re.compile(r"^\d\d:\d\d:\d\d ERROR multitag[\w.]*: ")


def stage_error(lines: list[str]) -> str:
    """The stage's own error message (its last ERROR log line and the lines continuing it), else
    DVC's; the whole output is in the log already."""
    starts = [i for i, line in enumerate(lines) if _STAGE_ERROR.match(line)]
    if not starts:
        return next((line for line in reversed(lines) if line.startswith("ERROR")), "see the log above")
    first = starts[-1]
    end = next((i for i in range(first + 1, len(lines)) if re.match(r"^(\d\d:\d\d:\d\d |ERROR)", lines[i])),
               len(lines))
    return "\n".join([_STAGE_ERROR.sub("", lines[first]), *lines[first + 1:end]])


def run_stage(stage: str, workdir: str) -> bool:
    """`dvc repro` one stage in ``workdir``. Returns whether the stage's command ran (DVC says "Running
    stage"); outputs DVC only restored from its cache, e.g. after a failed run removed them, are not a run."""
    RUNNING["stage"] = stage
    code, lines = run_dvc(["repro", "--single-item", stage], workdir)
    RUNNING["stage"] = None
    if code != 0:
        if any(f"exited with {EXIT_TRANSIENT}" in line for line in lines):
            raise TransientStageError(f"stage {stage!r} failed on transient I/O: {stage_error(lines)}")
        raise StageFailed(f"stage {stage!r} failed: {stage_error(lines)}")
    ran = any(line.startswith(f"Running stage '{stage}'") for line in lines)
    get_run_logger().info("stage %s %s", stage, "ran" if ran else "unchanged, skipped by DVC")
    return ran


@task(name="dvc-add", retries=2, retry_delay_seconds=10)
def dvc_add(workdir: str, path: str) -> None:
    """`dvc add` a data folder (its .dvc file is then committed to git)."""
    code, lines = run_dvc(["add", path], workdir)
    if code != 0:
        raise StageFailed(f"dvc add {path} failed:\n" + "\n".join(lines[-15:]))


@task(name="push", retries=3, retry_delay_seconds=15)
def push(workdir: str) -> dict:
    """`dvc push` everything DVC tracks (stage outputs and added data) to the default DVC remote, if
    one is configured. Retried on any failure: pushing is idempotent I/O (content-addressed uploads)."""
    code, lines = run_dvc(["remote", "default"], workdir)
    if code != 0 or not lines:
        return {"pushed": False, "remote": None}
    remote = lines[-1].strip()
    code, out = run_dvc(["push", "--remote", remote], workdir)
    if code != 0:
        raise StageFailed(f"dvc push to remote {remote!r} failed:\n" + "\n".join(out[-10:]))
    return {"pushed": True, "remote": remote}

