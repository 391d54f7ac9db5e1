"""No analytics, from any entry point: the settings that turn Prefect's and DVC's telemetry off,
applied by the CLI before Prefect is imported and passed to every process it starts (DVC, Prefect
server, worker), so a user's plain shell gets a clean log too."""

from __future__ import annotations

import os

QUIET = {"DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def quiet_env(**extra: str) -> dict:
    """This process's environment with telemetry off (and ``extra`` set), for a child process."""
    return {**os.environ, **QUIET, **extra}


def silence() -> None:
    """Turn telemetry off for this process and its children (call before importing Prefect)."""
    os.environ.update(QUIET)
