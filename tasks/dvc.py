"""Running DVC from Prefect tasks: a stage as `dvc repro` runs it (DVC decides whether it is up to
date, skips it if so, and records the run in dvc.lock), `dvc add`, `dvc push`; the output of DVC
and of the stage goes into the task's Prefect log with secrets masked."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

from prefect import get_run_logger, task

from multitag.errors import EXPECTED, StageFailed, StoreUnavailable, TransientStageError, is_transient
from multitag.logs import redact
from multitag.telemetry import quiet_env


RUNNING: dict[str, str | None] = {"stage": None}  # the stage being run, for the CLI's Ctrl-C message


def retry_transient_only(task, task_run, state) -> bool:
    """Prefect retry_condition_fn: retry a task only when it failed on transient I/O (its stage failed
    on an unreachable store or cluster, or a network error)."""
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


_STAGE_COMMAND = re.compile(r"multitag stage (\w+)")


class _ToTaskLog(logging.Handler):
    """Log records of the stage and of DVC, into the Prefect task's log (secrets masked)."""

    def __init__(self, logger):
        super().__init__()
        self.task_logger = logger

    def emit(self, record: logging.LogRecord) -> None:
        self.task_logger.log(record.levelno, "%s", redact(record.getMessage()))


@contextlib.contextmanager
def _logs_into(task_logger, levels=(("multitag", logging.INFO), ("dvc", logging.INFO))):
    """While a stage runs in this process: its log and DVC's go into the task's log (the terminal gets
    them from there) instead of their own handlers (DVC's print to stdout) or the root logger's."""
    loggers = [logging.getLogger(n) for n, _ in levels]
    handler = _ToTaskLog(task_logger)
    before = [(lg.handlers, lg.propagate, lg.level) for lg in loggers]
    for lg, (_, level) in zip(loggers, levels):
        lg.handlers, lg.propagate = [handler], False
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, (handlers, propagate, level) in zip(loggers, before):
            lg.handlers, lg.propagate, lg.level = handlers, propagate, level


def run_stage(stage: str, workdir: str) -> bool:
    """`dvc repro --single-item STAGE` in this process, through DVC's Python API: DVC decides whether
    the stage is up to date (skipped), restores it from its run cache, or runs it, and records the run
    in dvc.lock, as `dvc repro` does. Only the command differs: dvc.yaml's `multitag stage NAME` runs
    here as a function call (multitag/stages.py) instead of a new process, so Python, torch and
    multitag are loaded once per pipeline, not once per stage; any other command runs as DVC runs it.
    Returns whether the stage's command ran (not: skipped, or only restored from DVC's cache)."""
    import dvc.stage.run as dvc_run
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    from multitag.stages import run_stage as run_here

    logger = get_run_logger()
    shell_command, ran = dvc_run.cmd_run, []

    def command(dvc_stage, dry=False, run_env=None):
        match = _STAGE_COMMAND.fullmatch(dvc_stage.cmd.strip()) if isinstance(dvc_stage.cmd, str) else None
        ran.append(not dry)
        if dry or not match:
            return shell_command(dvc_stage, dry=dry, run_env=run_env)
        logging.getLogger("dvc.stage.run").info("Running stage '%s':\n> %s", dvc_stage.addressing, dvc_stage.cmd)
        run_here(match.group(1), workdir)

    RUNNING["stage"] = stage
    try:
        # From inside the workspace, as `dvc repro` runs: DVC reads a target's dvc.yaml from the current
        # folder. DVC calls dvc.stage.run.cmd_run by its module name for each command it runs (dvc 3):
        # replaced for this call only; were it renamed, DVC would run the command in a shell as before.
        with (_logs_into(logger), contextlib.chdir(workdir), mock.patch.object(dvc_run, "cmd_run", command),
              Repo(workdir) as repo):
            repo.reproduce(f"dvc.yaml:{stage}", single_item=True)
    except DvcException as err:  # a stage that failed, or DVC's own refusal (a missing dependency ...)
        cause = err.__cause__ or err
        if not isinstance(cause, EXPECTED):  # a bug: its traceback belongs in the log
            logger.error("stage %s failed", stage, exc_info=cause)
        error = TransientStageError if is_transient(cause) else StageFailed
        raise error(f"stage {stage!r} failed{' on transient I/O' if error is TransientStageError else ''}: "
                    f"{redact(str(cause))}") from None
    finally:
        RUNNING["stage"] = None
    logger.info("stage %s %s", stage, "ran" if ran else "skipped by DVC: up to date, or restored from its cache")
    return any(ran)


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
    from dvc.repo import Repo

    with Repo(workdir) as repo:
        remote = repo.config["core"].get("remote")
    if not remote:
        get_run_logger().info("no default DVC remote: nothing pushed (multitag remote setup URL sets one)")
        return {"pushed": False, "remote": None}
    code, out = run_dvc(["push", "--remote", remote], workdir)
    if code != 0:
        raise StageFailed(f"dvc push to remote {remote!r} failed:\n" + "\n".join(out[-10:]))
    return {"pushed": True, "remote": remote}

