import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from flows.server import free_port
from multitag.layout import Layout

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# No analytics from Prefect or DVC in tests; Prefect state and logs go to a throwaway home.
os.environ.update({"DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                   # Prefect's console handler would log the ephemeral server's shutdown into
                   # pytest's already-closed capture stream.
                   "PREFECT_LOGGING_LEVEL": "WARNING",
                   # the ephemeral API server migrates a fresh database first: 20 s (the default
                   # wait) is not always enough on 2 busy cores
                   "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
                   # the suite's workers share the cores (xdist, and the processes their tests start): torch's
                   # libgomp threads then sleep after 1,000 spins instead of 300,000, so that they do not take
                   # the cores from each other (two trainings at once 1.75-2.75x faster: bench/threads.py).
                   # Set before any test loads torch; it changes how threads wait, not what they compute.
                   "GOMP_SPINCOUNT": "1000"})
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("MULTITAG_STORE_URI", None)


@pytest.fixture(scope="session", autouse=True)
def prefect_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    os.environ["PREFECT_HOME"] = str(home)
    yield home


def tiny_params(**overrides) -> dict:
    """The repo's params.yaml shrunk to a few dozen images and one quick epoch."""
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["sample"].update(n_images=48, seed=1)
    p["ingest"].update(image_size=32, val_fraction=0.25, test_fraction=0.25)
    p["train"].update(epochs=1, batch_size=8, patience=1)
    for section, values in overrides.items():
        p[section].update(values)
    return p


def run(cmd, cwd, check=True, env=None, **kw):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def init_workspace(ws: Path, params: dict | None = None) -> Path:
    """A fresh git + DVC workspace holding the project's dvc.yaml, a params.yaml (tiny by default)
    and the package sources that dvc.yaml lists as dependencies."""
    ws.mkdir(parents=True)
    shutil.copy(ROOT / "dvc.yaml", ws)
    shutil.copy(ROOT / "lineage.yaml", ws)
    shutil.copy(ROOT / ".gitignore", ws)
    shutil.copy(ROOT / ".dvcignore", ws)
    shutil.copytree(ROOT / "multitag", ws / "multitag", ignore=shutil.ignore_patterns("__pycache__"))
    (ws / "params.yaml").write_text(yaml.safe_dump(params or tiny_params(), sort_keys=False))
    run(["git", "init", "-q"], ws)
    run(["git", "config", "user.email", "test@example.com"], ws)
    run(["git", "config", "user.name", "test"], ws)
    run([str(BIN / "dvc"), "init", "-q"], ws)
    run([str(BIN / "dvc"), "config", "core.analytics", "false"], ws)
    return ws


@pytest.fixture
def workspace(tmp_path):
    return init_workspace(tmp_path / "ws")


@pytest.fixture(scope="session")
def moto_endpoint():
    """A real S3 API over HTTP on loopback: moto_server, started here and stopped afterwards."""
    port = free_port()
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_until_serving(proc, url + "/moto-api/", 60, lambda: "moto_server did not start")
    yield url
    stop_process_group(proc)


SECRET = "tEsT-SeCrEt-8f2b6c1d9e7a4035"


@pytest.fixture
def s3_bucket(moto_endpoint, monkeypatch):
    """A fresh bucket on the moto endpoint; AWS settings in the environment as a user would set them."""
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIATESTKEYID0000000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    name = f"mt-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "s3"])
def store_uri(request, tmp_path):
    """The same tests against both stores: a local folder and S3 over HTTP."""
    if request.param == "local":
        return str(tmp_path / "store")
    return f"s3://{request.getfixturevalue('s3_bucket')}/artifacts"


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real Prefect server (API + UI), started by `multitag server` on a free loopback port with
    its own PREFECT_HOME; yields its API URL and stops it afterwards."""
    port = free_port()
    home = tmp_path_factory.mktemp("prefect-server-home")
    log = open(home / "server.log", "w")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PREFECT_HOME": str(home),
           # schedule runs promptly (the default loop is 60 s)
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5"}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([str(BIN / "multitag"), "server", "--port", str(port)], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    wait_until_serving(proc, api + "/health", 120,
                       lambda: "prefect server did not start:\n" + (home / "server.log").read_text()[-3000:])
    yield api
    stop_process_group(proc)


def prefect_api(api: str, path: str, body: dict | None = None):
    """GET (or POST ``body``) the test's Prefect server; on 2 cores, with a training run in flight,
    it once took longer than 30 s to answer, hence the long read timeout."""
    import httpx

    r = httpx.post(api + path, json=body, timeout=90) if body is not None else httpx.get(api + path, timeout=90)
    r.raise_for_status()
    return r.json()


class Webhook(ThreadingHTTPServer):
    """A real HTTP receiver on loopback, the target of alert webhooks: keeps each POST's ``text``."""

    def __init__(self):
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"])))["text"])
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server_port}/hook"

    def messages(self, want: int, timeout: float = 90) -> list[str]:
        """The messages once ``want`` arrived (or the time ran out), after a pause for any extra."""
        deadline = time.time() + timeout
        while len(self.received) < want and time.time() < deadline:
            time.sleep(0.5)
        time.sleep(3)
        return list(self.received)


@pytest.fixture
def webhook():
    server = Webhook()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def delete_automations(api: str, names: list[str]) -> None:
    """Automations off the Prefect server at ``api`` again: no alerts for other tests."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        for automation in (a for name in names for a in client.read_automations_by_name(name)):
            client.delete_automation(automation.id)


def wait_until_serving(proc: subprocess.Popen, url: str, timeout: float, failure) -> None:
    """Wait until ``url`` answers; if ``proc`` exits or the time runs out, stop it and raise
    RuntimeError(failure())."""
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                stop_process_group(proc)
                raise RuntimeError(failure())
            time.sleep(0.3)


def stop_process_group(proc: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 20) -> None:
    """Stop a process started with start_new_session=True and everything it started."""
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture
def data(tmp_path) -> Layout:
    return tiny_data(tmp_path / "data-ws")


def tiny_data(root: Path) -> Layout:
    """A workspace holding a tiny learnable dataset, as ingest and labels write it: label j is on
    when channel j's mean is bright."""
    rng = np.random.default_rng(0)
    n, size = 96, 16
    y = (rng.random((n, 3)) < 0.4).astype(np.uint8)
    x = rng.integers(0, 100, (n, size, size, 3), dtype=np.uint8)
    x[..., :3] += (y[:, None, None, :] * 120).astype(np.uint8)
    ws = Layout(root)
    ws.shards.mkdir(parents=True)
    ws.labels.mkdir()
    split = np.array(["train"] * 64 + ["val"] * 16 + ["test"] * 16)
    np.save(ws.shard(0), x[:50])
    np.save(ws.shard(1), x[50:])
    digests = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]
    pd.DataFrame({"id": [d[:16] for d in digests], "source": [f"{i}.png" for i in range(n)],
                  "sha256": digests, "split": split,
                  "tags": [[c for c, on in zip("abc", row) if on] for row in y],
                  "shard": [0] * 50 + [1] * 46, "offset": list(range(50)) + list(range(46))}).to_parquet(ws.manifest)
    np.save(ws.targets, y)
    ws.vocabulary.write_text(json.dumps({"labels": ["a", "b", "c"]}))
    return ws


def copy_data(ws: Layout, root: Path) -> Layout:
    """Another workspace with the same prepared data and labels (nothing trained yet)."""
    new = Layout(root)
    shutil.copytree(ws.prepared, new.prepared)
    shutil.copytree(ws.labels, new.labels)
    return new
