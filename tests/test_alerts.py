"""Alerts through Prefect automations on a real Prefect server, delivered to a real HTTP receiver on
loopback (the webhook): a failed retrain run, a flagged batch and a stale champion each deliver one
message naming the run with its link; setting the alerts up again does not duplicate them; a
receiver that is down fails no run; no retrain within the period is an alert of its own."""

import time

import pytest
from prefect import flow
from prefect.client.orchestration import get_client

from flows.alerts import alert, set_up_alerts
from multitag.config import RetrainParams, parse_params
from multitag.errors import ConfigError
from tests.conftest import delete_automations, free_port


@flow(name="retrain")
def flagged_and_stale(workspace: str) -> None:
    """What the retrain flow emits on a flagged batch and a stale champion."""
    alert("multitag.batch.flagged", "batch(es) b7: the champion's mAP there is more than retrain.alert_drop below",
          workspace)
    alert("multitag.champion.stale", "3 versions registered since champion v4, none promoted", workspace)


def test_alerts_reach_the_webhook_once_each(prefect_server, webhook, tmp_path, monkeypatch):
    from flows.retrain import retrain

    monkeypatch.setenv("PREFECT_API_URL", prefect_server)
    r = RetrainParams(alert_webhook=webhook.url)
    names = set_up_alerts(r)
    try:
        assert set_up_alerts(r.model_copy(update={"alert_stale_versions": 5})) == names  # again: updated, not added
        with get_client(sync_client=True) as client:
            automations = [a for name in names for a in client.read_automations_by_name(name)]
        assert len(automations) == len(names) == 4
        assert "5 registrations" in next(a.description for a in automations if a.name == "multitag: champion stale")

        (tmp_path / "ws").mkdir()  # no params.yaml: the retrain run fails
        with pytest.raises(ConfigError):
            retrain(workdir=str(tmp_path / "ws"))
        flagged_and_stale("photos")
        messages = webhook.messages(3)
        with get_client(sync_client=True) as client:
            runs = {run.name: run for run in client.read_flow_runs()}
        failed = [m for m in messages if "Failed" in m]
        flagged = [m for m in messages if "batch was flagged" in m]
        stale = [m for m in messages if "champion was not replaced" in m]
        assert (len(failed), len(flagged), len(stale)) == (1, 1, 1), messages
        failed_run = next(run for run in runs.values() if run.state_name == "Failed")
        assert failed_run.name in failed[0] and f"/runs/flow-run/{failed_run.id}" in failed[0]
        assert "b7" in flagged[0] and "/runs/flow-run/" in flagged[0] and "v4" in stale[0]

        set_up_alerts(RetrainParams(alert_webhook=f"http://127.0.0.1:{free_port()}/hook"))  # nothing listens there
        flagged_and_stale("photos")  # the run completes: the server notifies, not the run
    finally:
        delete_automations(prefect_server, names)


def test_no_retrain_within_the_period_is_an_alert(prefect_server, webhook, monkeypatch):
    """The proactive trigger: no retrain run completed for alert_no_retrain_s (its least, 60 s)."""
    monkeypatch.setenv("PREFECT_API_URL", prefect_server)
    names = set_up_alerts(RetrainParams(alert_webhook=webhook.url, alert_no_retrain_s=60))
    try:
        start = time.time()
        deadline = start + 150
        while not any("no retrain completed" in m for m in webhook.received) and time.time() < deadline:
            time.sleep(1)
        waited = time.time() - start
    finally:
        delete_automations(prefect_server, names)
    silent = [m for m in webhook.received if "no retrain completed" in m]
    assert len(silent) == 1 and "in the last 60 s" in silent[0], webhook.received
    assert waited >= 55  # not before the period ended


def test_an_alert_webhook_must_be_a_web_address():
    with pytest.raises(ConfigError, match="retrain.alert_webhook"):
        parse_params({"retrain": {"alert_webhook": "file:///etc/passwd"}})
