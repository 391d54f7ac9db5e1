"""A Prefect API server for the schedule when none is configured: `multitag serve` on a single machine
needs one (an ephemeral API cannot schedule runs); and Prefect's temporary server for a run started
early. Nothing here imports Prefect at the top: PREFECT_API_URL must be set before Prefect is
imported, since Prefect reads its settings then."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from multitag.telemetry import quiet_env

log = logging.getLogger(__name__)

NEEDS_SERVER = ("PREFECT_API_URL is not set, and scheduled runs need a Prefect server: start one with "
                "`multitag server` (or `make ui`) in another terminal, then `export PREFECT_API_URL="
                "http://127.0.0.1:4200/api` in this one")


def require_api() -> str:
    """The configured Prefect API, or a RuntimeError saying exactly what to run first."""
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        raise RuntimeError(NEEDS_SERVER)
    return url


def healthy(api: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@contextmanager
def prefect_api(port: int, log_file: Path, timeout: float = 120):
    """PREFECT_API_URL if set; else a Prefect server on 127.0.0.1:``port``: one already serving there,
    or one started here (its log in ``log_file``) and stopped on exit."""
    if os.environ.get("PREFECT_API_URL"):
        yield os.environ["PREFECT_API_URL"]
        return
    api = f"http://127.0.0.1:{port}/api"
    proc = None
    if not healthy(api):
        log.info("PREFECT_API_URL is not set: starting a Prefect server at http://127.0.0.1:%d (API and UI; "
                 "its log in %s)", port, log_file)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        prefect = str(Path(sys.executable).with_name("prefect"))
        proc = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                env=quiet_env(PREFECT_UI_API_URL=api), stdout=log_file.open("w"),
                                stderr=subprocess.STDOUT)  # in our process group: Ctrl-C stops it too
        if not _serving(proc, api, timeout):
            _stop(proc)
            raise RuntimeError(f"the Prefect server did not start on port {port}; its log ({log_file}) ends: "
                               + log_file.read_text()[-800:])
    os.environ["PREFECT_API_URL"] = api
    try:
        yield api
    finally:
        if proc is not None:
            _stop(proc)


def _serving(proc: subprocess.Popen, api: str, timeout: float) -> bool:
    """Wait until the server ``proc`` started answers at ``api``: True; False once it has exited or
    ``timeout`` seconds have passed."""
    deadline = time.time() + timeout
    while not healthy(api):
        if proc.poll() is not None or time.time() > deadline:
            return False
        time.sleep(0.1)
    return True


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def temporary_api():
    """Prefect's temporary API server for a flow run from the command line when no API is configured
    (PREFECT_API_URL in the environment or the Prefect profile), started as Prefect's ephemeral mode
    starts it (uvicorn serving Prefect's server app, no UI), but before the caller loads what the run
    needs rather than at the first flow call: Prefect's own start imports the server's code in the
    caller's process first (4 s on 2 cores), then waits 7-10 s for it to answer. It registers no block
    types at its start: their memo alone imports every installed Prefect integration (3 s), and a
    temporary server only records this command's flow and task runs (a `multitag server` or `prefect
    server start` registers them). Yields the function that waits until it answers; within the block
    Prefect uses it, and it stops when the block ends."""
    from prefect.settings import (PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED,
                                  PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, PREFECT_UI_URL,
                                  get_current_settings, temporary_settings)

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        yield lambda: None
        return
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = quiet_env(**get_current_settings().to_environment_variables(exclude_unset=True), PREFECT_UI_ENABLED="0",
                    PREFECT__SERVER_EPHEMERAL="1", PREFECT__SERVER_FINAL="1",
                    PREFECT_SERVER_REGISTER_BLOCKS_ON_START="false",
                    PREFECT_SERVER_MEMOIZE_BLOCK_AUTO_REGISTRATION="false")
    log.info("PREFECT_API_URL is not set: this command's flow runs on a temporary Prefect server at %s (to watch "
             "runs in the UI as they go, start `multitag server` and set PREFECT_API_URL)", api)
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
                             "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"],
                            env=env)

    def wait() -> None:
        timeout = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
        if not _serving(proc, api, timeout):
            raise RuntimeError(
                "Prefect's temporary API server did not start "
                + (f"(exit status {proc.returncode}; its error is printed above)" if proc.poll() is not None
                   else f"within {timeout} s (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)")
                + ": start one with `multitag server` and set PREFECT_API_URL=http://127.0.0.1:4200/api")

    try:
        # PREFECT_UI_URL empty: no "View at" link to a UI this server does not serve
        with temporary_settings({PREFECT_API_URL: api, PREFECT_UI_URL: ""}):
            try:
                yield wait
            finally:  # the log lines and events Prefect still holds, sent before the server stops
                from prefect.events.worker import EventsWorker
                from prefect.logging.handlers import APILogWorker

                for worker in (APILogWorker, EventsWorker):
                    logging.getLogger(worker.__name__).setLevel(logging.ERROR)  # not "Still processing items"
                    worker.drain_all(timeout=10)
    finally:
        _stop(proc)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
