"""A Prefect API server for the schedule when none is configured: `multitag serve` on a single machine
needs one (an ephemeral API cannot schedule runs); and Prefect's temporary server for a run started
early. Nothing here imports Prefect at the top: PREFECT_API_URL must be set before Prefect is
imported, since Prefect reads its settings then."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
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
        deadline = time.time() + timeout
        while not healthy(api):
            if proc.poll() is not None or time.time() > deadline:
                _stop(proc)
                raise RuntimeError(f"the Prefect server did not start on port {port}; its log ({log_file}) ends: "
                                   + log_file.read_text()[-800:])
            time.sleep(0.5)
    os.environ["PREFECT_API_URL"] = api
    try:
        yield api
    finally:
        if proc is not None:
            _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_temporary_api():
    """Without PREFECT_API_URL, a flow runs on Prefect's temporary API server, which the first flow
    call starts and waits for (10-20 s on 2 cores, mostly importing the server). Start it now in a
    thread instead, so that the caller loads what the run needs meanwhile; returns the function that
    waits for it (and raises its error). Prefect keeps one temporary server per process, so the flow
    then finds this one running."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return lambda: None
    from prefect.server.api.server import SubprocessASGIServer

    errors: list[BaseException] = []

    def start():
        try:
            SubprocessASGIServer().start()
        except Exception as err:  # raised in the caller's thread by wait()
            errors.append(err)

    thread = threading.Thread(target=start, name="prefect-temporary-server", daemon=True)
    thread.start()

    def wait() -> None:
        thread.join()
        if errors:
            raise errors[0]
    return wait
