"""No analytics, from any entry point: the settings that turn Prefect's and DVC's telemetry off,
applied by the CLI before Prefect is imported and passed to every process it starts (DVC, Prefect
server, worker), so a user's plain shell gets a clean log too."""

from __future__ import annotations

import os

QUIET = {"DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def quiet_env(**extra: str) -> dict:
    """This process's environment with telemetry off (and ``extra`` set), for a child process."""
    return {**os.environ, **QUIET, **extra}


# Prefect's temporary API server creates its database on a first run, which takes longer than the
# 20 s Prefect waits by default on a 2-core machine ("Timed out while attempting to connect to
# ephemeral Prefect API server"): wait up to 120 s unless the user set another bound.
STARTUP_WAIT = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}


def silence() -> None:
    """Turn telemetry off for this process and its children (call before importing Prefect), and give
    Prefect's temporary server the time a first start takes."""
    os.environ.update(QUIET)
    for key, value in STARTUP_WAIT.items():
        os.environ.setdefault(key, value)
