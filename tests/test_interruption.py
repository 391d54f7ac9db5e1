"""Interruption and noise: Ctrl-C stops a real `multitag run` at once with one line, and the next run
resumes, in a plain shell (no analytics settings in the environment) that gets a clean log."""

import json
import os
import re
import signal
import subprocess

import pytest

from flows.server import healthy
from tests.conftest import BIN, init_workspace, tiny_params
from tests.test_retrain_server import wait_for

pytestmark = pytest.mark.slow

QUIET_VARS = ("DO_NOT_TRACK", "DVC_NO_ANALYTICS", "PREFECT_SERVER_ANALYTICS_ENABLED", "PREFECT_LOGGING_LEVEL",
              "PREFECT_API_URL")


def _plain_shell_env(tmp_path) -> dict:
    """A user's shell: none of the telemetry settings, Prefect's state in a fresh home."""
    env = {k: v for k, v in os.environ.items() if k not in QUIET_VARS}
    return {**env, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PREFECT_HOME": str(tmp_path / "prefect-home")}


def _run_in_plain_shell(ws, tmp_path):
    proc = subprocess.run([str(BIN / "multitag"), "run"], cwd=ws, env=_plain_shell_env(tmp_path), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_ctrl_c_stops_a_run_at_once_with_one_line_and_the_next_run_resumes(tmp_path):
    # enough epochs that Ctrl-C after the first lands mid-training (patience as long: no early stop)
    ws = init_workspace(tmp_path / "ws", tiny_params(sample={"n_images": 160}, train={"epochs": 12, "patience": 12}))
    proc = subprocess.Popen([str(BIN / "multitag"), "run"], cwd=ws, env=_plain_shell_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    checkpoint = ws / ".multitag/checkpoints/last.pt"
    wait_for(lambda: checkpoint.exists() or proc.poll() is not None, 300, "the first training checkpoint", 0.1)
    assert proc.poll() is None, f"the run ended before it could be interrupted:\n{proc.communicate()[1][-3000:]}"
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole foreground process group
    try:
        out, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("multitag run did not stop within 10 s of Ctrl-C")
    assert proc.returncode == 130
    assert "Traceback" not in err, err[-3000:]
    [line] = [x for x in err.splitlines() if "interrupted" in x]
    assert "interrupted during stage train; run `multitag run` again to resume" in line
    assert not (ws / "models/model.pt").exists()

    resumed = _run_in_plain_shell(ws, tmp_path)  # a user's plain shell: and its log is clean
    assert "registered version       v1" in resumed.stdout
    assert "Traceback" not in resumed.stderr and "database is locked" not in resumed.stderr
    assert "telemetry" not in resumed.stderr.lower() and "analytics" not in resumed.stderr.lower()
    # no API configured: a temporary Prefect server ran the flow, got its last log lines, and is gone
    [api] = re.findall(r"runs on a temporary Prefect server at (\S+)", resumed.stderr)
    assert not healthy(api) and "Error logging to API" not in resumed.stderr and "View at" not in resumed.stderr
    log = json.loads((ws / ".multitag/runs/train.json").read_text())
    assert log["resumed_from_epoch"] >= 1 and log["start"].startswith("resumed from .multitag/checkpoints/last.pt")
