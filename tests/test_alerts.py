"""Alerts through Prefect automations on a real Prefect server, delivered to a real HTTP receiver on
loopback (the webhook): a failed retrain run, a flagged batch and a stale champion each deliver one
message naming the run with its link; setting the alerts up again does not duplicate them; a
receiver that is down fails no run; no retrain within the period is an alert of its own."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prefect import flow
from prefect.client.orchestration import get_client

from flows.alerts import alert, set_up_alerts
from multitag.config import RetrainParams, parse_params
from multitag.errors import ConfigError
from tests.conftest import free_port


class Receiver(BaseHTTPRequestHandler):
    received: list[str] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Receiver.received.append(json.loads(body)["text"])
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def _messages(want: int, timeout: float = 90) -> list[str]:
    deadline = time.time() + timeout
    while len(Receiver.received) < want and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(3)  # and nothing more than wanted
    return list(Receiver.received)


def _delete(names: list[str]) -> None:
    """The automations off the session's server again: no alerts for the other tests."""
    with get_client(sync_client=True) as client:
        for automation in (a for name in names for a in client.read_automations_by_name(name)):
            client.delete_automation(automation.id)


@flow(name="retrain")
def flagged_and_stale(workspace: str) -> None:
    """What the retrain flow emits on a flagged batch and a stale champion."""
    alert("multitag.batch.flagged", "batch(es) b7: the champion's mAP there is more than retrain.alert_drop below",
          workspace)
    alert("multitag.champion.stale", "3 versions registered since champion v4, none promoted", workspace)


def test_alerts_reach_the_webhook_once_each(prefect_server, tmp_path, monkeypatch):
    from flows.retrain import retrain

    monkeypatch.setenv("PREFECT_API_URL", prefect_server)
    Receiver.received = []
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        r = RetrainParams(alert_webhook=f"http://127.0.0.1:{server.server_port}/hook")
        names = set_up_alerts(r)
        assert set_up_alerts(r.model_copy(update={"alert_stale_versions": 5})) == names  # again: updated, not added
        with get_client(sync_client=True) as client:
            automations = [a for name in names for a in client.read_automations_by_name(name)]
        assert len(automations) == len(names) == 4
        assert "5 registrations" in next(a.description for a in automations if a.name == "multitag: champion stale")

        (tmp_path / "ws").mkdir()  # no params.yaml: the retrain run fails
        with pytest.raises(ConfigError):
            retrain(workdir=str(tmp_path / "ws"))
        flagged_and_stale("photos")
        messages = _messages(3)
    finally:
        server.shutdown()
    with get_client(sync_client=True) as client:
        runs = {run.name: run for run in client.read_flow_runs()}
    failed = [m for m in messages if "Failed" in m]
    flagged = [m for m in messages if "batch was flagged" in m]
    stale = [m for m in messages if "champion was not replaced" in m]
    assert (len(failed), len(flagged), len(stale)) == (1, 1, 1), messages
    failed_run = next(run for run in runs.values() if run.state_name == "Failed")
    assert failed_run.name in failed[0] and f"/runs/flow-run/{failed_run.id}" in failed[0]
    assert "b7" in flagged[0] and "/runs/flow-run/" in flagged[0] and "v4" in stale[0]

    down = RetrainParams(alert_webhook=f"http://127.0.0.1:{free_port()}/hook")  # nothing listens there
    set_up_alerts(down)
    flagged_and_stale("photos")  # the run completes: the server notifies, not the run
    _delete(names)


def test_no_retrain_within_the_period_is_an_alert(prefect_server, monkeypatch):
    """The proactive trigger: no retrain run completed for alert_no_retrain_s (its least, 60 s)."""
    monkeypatch.setenv("PREFECT_API_URL", prefect_server)
    Receiver.received = []
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        names = set_up_alerts(RetrainParams(alert_webhook=f"http://127.0.0.1:{server.server_port}/hook",
                                            alert_no_retrain_s=60))
        start = time.time()
        deadline = start + 150
        while not any("no retrain completed" in m for m in Receiver.received) and time.time() < deadline:
            time.sleep(1)
        waited = time.time() - start
    finally:
        server.shutdown()
        _delete(names)
    silent = [m for m in Receiver.received if "no retrain completed" in m]
    assert len(silent) == 1 and "in the last 60 s" in silent[0], Receiver.received
    assert waited >= 55  # not before the period ended


def test_an_alert_webhook_must_be_a_web_address():
    with pytest.raises(ConfigError, match="retrain.alert_webhook"):
        parse_params({"retrain": {"alert_webhook": "file:///etc/passwd"}})
