"""Run one dvc.yaml stage from a Prefect task: DVC decides whether it is up to date (and skips
it), records the run in dvc.lock; its output streams into the task's Prefect log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from prefect import get_run_logger

from multitag.cli import EXIT_TRANSIENT
from multitag.redact import redact
from multitag.storage import StoreUnavailable


class StageFailed(RuntimeError):
    """The stage failed on bad input or a bug: retrying would fail again."""


class TransientStageError(StageFailed):
    """The stage failed on transient I/O (its command exited with EX_TEMPFAIL): worth a retry."""


def retry_transient_only(task, task_run, state) -> bool:
    """Prefect retry_condition_fn: retry a task only when it failed on transient I/O (its stage
    exited with EX_TEMPFAIL, or the store was unreachable)."""
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
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
            "DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1"}


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


def run_stage(stage: str, workdir: str, with_upstream: bool = False) -> bool:
    """`dvc repro` one stage in ``workdir`` (with the stages it depends on if ``with_upstream``).
    Returns True if the stage ran, False if DVC found it unchanged and skipped it."""
    code, lines = run_dvc(["repro", *([] if with_upstream else ["--single-item"]), stage], workdir)
    if code != 0:
        tail = "\n".join(lines[-15:])
        if any(f"exited with {EXIT_TRANSIENT}" in line for line in lines):
            raise TransientStageError(f"stage {stage!r} failed on transient I/O:\n{tail}")
        raise StageFailed(f"stage {stage!r} failed:\n{tail}")
    ran = any(f"Running stage '{stage}'" in line for line in lines)
    get_run_logger().info("stage %s %s", stage, "ran" if ran else "unchanged, skipped by DVC")
    return ran


def read_json(workdir: str, rel: str) -> dict:
    return json.loads((Path(workdir) / rel).read_text())
