"""Alerts: Prefect automations that notify a team through a Prefect notification block, created (or
updated, by name) by `multitag deploy`. The Prefect server evaluates them, so an alert needs no
multitag process running, and a receiver that is down never fails a run.

- a retrain or pipeline run failed or crashed;
- a batch check ended Flagged (event ``multitag.batch.flagged``, emitted by the retrain flow);
- the champion was not replaced for ``retrain.alert_stale_versions`` registrations in a row while
  new data arrived (event ``multitag.champion.stale``, emitted by the retrain flow);
- no retrain completed for ``retrain.alert_no_retrain_s`` (a proactive trigger: the absence of an
  event).

Each message names the flow run, the reason and the run's page in the UI (``PREFECT_UI_URL`` where
the alerts are set up; by default the API's address without ``/api``). The block is
``retrain.alert_block`` (any notification block made in the UI), or one made here from
``retrain.alert_webhook``: a POST of Slack-compatible JSON ``{"text": ...}``, which Slack,
Microsoft Teams and Mattermost incoming webhooks accept.
"""

from __future__ import annotations

from datetime import timedelta

from prefect.events import emit_event

from multitag.config import RetrainParams

BLOCK = "multitag-alerts"
FLOWS = ["retrain", "training-pipeline"]


def automations(block_id, r: RetrainParams, ui_url: str) -> list:
    """The four automations, as Prefect's AutomationCore objects; messages link to ``ui_url``."""
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    flows = {"prefect.resource.role": "flow", "prefect.resource.name": FLOWS}
    # the link spelled out: the server's own ui_url filter gave None for some runs (no UI URL set there)
    run_link = "{{ flow_run.name }}: " + ui_url.rstrip("/") + "/runs/flow-run/{{ flow_run.id }}"

    def notify(subject: str, body: str) -> list:
        return [SendNotification(block_document_id=block_id, subject=subject, body=body)]

    return [
        AutomationCore(name="multitag: run failed", description="a retrain or pipeline run failed or crashed",
                       trigger=EventTrigger(expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
                                            match={"prefect.resource.id": "prefect.flow-run.*"}, match_related=flows,
                                            posture=Posture.Reactive, threshold=1),
                       actions=notify("multitag: {{ flow_run.name }} {{ flow_run.state.name }}",
                                      "{{ flow_run.state.name }}: {{ flow_run.state.message }}\n" + run_link)),
        AutomationCore(name="multitag: batch flagged", description="a new batch scored far below the champion's test",
                       trigger=EventTrigger(expect={"multitag.batch.flagged"}, posture=Posture.Reactive, threshold=1),
                       actions=notify("multitag: a new batch was flagged", "{{ event.payload.message }}\n" + run_link)),
        AutomationCore(name="multitag: champion stale",
                       description=f"{r.alert_stale_versions} registrations in a row left the champion in place",
                       trigger=EventTrigger(expect={"multitag.champion.stale"}, posture=Posture.Reactive, threshold=1),
                       actions=notify("multitag: the champion was not replaced",
                                      "{{ event.payload.message }}\n" + run_link)),
        AutomationCore(name="multitag: no retrain", description=f"no retrain completed in {r.alert_no_retrain_s} s",
                       trigger=EventTrigger(expect={"prefect.flow-run.Completed"},
                                            match={"prefect.resource.id": "prefect.flow-run.*"},
                                            match_related={"prefect.resource.role": "flow",
                                                           "prefect.resource.name": "retrain"},
                                            posture=Posture.Proactive, threshold=1,
                                            within=timedelta(seconds=r.alert_no_retrain_s)),
                       actions=notify("multitag: no retrain completed",
                                      f"no retrain run completed in the last {r.alert_no_retrain_s} s; check the "
                                      "deployment's schedule and its worker")),
    ]


def set_up_alerts(r: RetrainParams) -> list[str]:
    """Create or update (by name) the notification block and the automations; returns their names,
    or [] when no alert target is configured."""
    if not (r.alert_webhook or r.alert_block):
        return []
    from prefect.blocks.notifications import CustomWebhookNotificationBlock, NotificationBlock
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    if r.alert_block:
        block = NotificationBlock.load(r.alert_block)
    else:
        # allow_private_urls: the webhook is the user's own setting, e.g. a chat server on their network
        block = CustomWebhookNotificationBlock(name="multitag alerts", url=r.alert_webhook, method="POST",
                                               json_data={"text": "*{{subject}}*\n{{body}}"}, allow_private_urls=True)
        block.save(BLOCK, overwrite=True)
        block = CustomWebhookNotificationBlock.load(BLOCK)
    with get_client(sync_client=True) as client:
        ui_url = get_current_settings().ui_url or str(client.api_url).removesuffix("/api/")
        wanted = automations(block._block_document_id, r, ui_url)
        for automation in wanted:
            [*existing] = client.read_automations_by_name(automation.name)
            if existing:
                client.update_automation(existing[0].id, automation)
                for duplicate in existing[1:]:
                    client.delete_automation(duplicate.id)
            else:
                client.create_automation(automation)
    return [a.name for a in wanted]


def alert(event: str, message: str, workspace: str) -> None:
    """Emit multitag's own event (``multitag.batch.flagged``, ``multitag.champion.stale``) from a
    flow run: the automations turn it into a message naming the run."""
    emit_event(event=event, resource={"prefect.resource.id": f"multitag.workspace.{workspace}",
                                      "prefect.resource.name": workspace}, payload={"message": message})
