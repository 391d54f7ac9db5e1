"""Deployments: `retrain` on a schedule from params.yaml (retrain.cron, retrain.timezone), at most
one run at a time (later ones wait: collision strategy ENQUEUE), on a Prefect process work pool
(this machine) or, with ``pool_type="kubernetes"``, on a Kubernetes work pool of GPU pods together
with `training-pipeline` (one pod per flow run, the workspace cloned from its git repository).
`multitag deploy` / `multitag serve` call these; infra/prefect.yaml describes the same deployments
for `prefect deploy`."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import ConcurrencyLimitConfig
from prefect.exceptions import ObjectNotFound
from prefect.schedules import Cron, Interval

from flows.alerts import set_up_alerts
from flows.kubernetes import base_job_template
from flows.retrain import retrain
from multitag.config import load_params

PROJECT = Path(__file__).resolve().parents[1]
DEPLOYMENT = "retrain"
ONE_AT_A_TIME = ConcurrencyLimitConfig(limit=1, collision_strategy="ENQUEUE")


def _schedule(workdir: Path, interval: float | None):
    p = load_params(workdir / "params.yaml").retrain
    if interval:
        return Interval(timedelta(seconds=interval)), p
    return Cron(p.cron, timezone=p.timezone), p


def ensure_work_pool(name: str, pool_type: str = "process") -> None:
    """Create the work pool if missing (a Kubernetes one with multitag's GPU base job template)."""
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            template = base_job_template() if pool_type == "kubernetes" else {}
            client.create_work_pool(WorkPoolCreate(name=name, type=pool_type, base_job_template=template))


def deploy(workdir: Path, interval: float | None = None, name: str = DEPLOYMENT) -> str:
    """Create or update the deployment on the Prefect API in PREFECT_API_URL; returns its id."""
    workdir = workdir.resolve()
    schedule, p = _schedule(workdir, interval)
    ensure_work_pool(p.work_pool)
    flow = retrain.from_source(source=str(PROJECT), entrypoint="flows/retrain.py:retrain")
    return str(flow.deploy(name=name, work_pool_name=p.work_pool, schedules=[schedule],
                           concurrency_limit=ONE_AT_A_TIME, parameters={"workdir": str(workdir)},
                           build=False, push=False, print_next_steps=False, tags=["multitag"], paused=False,
                           description=f"Retrain on new inbox batches in {workdir}"))


def deploy_kubernetes(workdir: Path, repository: str, image: str, pool: str, gpus: int = 1,
                      interval: float | None = None) -> list[str]:
    """`retrain` (on its schedule) and `training-pipeline` on the Kubernetes work pool ``pool``: each
    run a pod of ``image`` with ``gpus`` GPUs that clones ``repository`` (the workspace: code, DVC
    files, params) and runs the flow there. Returns the deployment ids."""
    from flows.pipeline import training_pipeline

    schedule, _ = _schedule(workdir.resolve(), interval)
    ensure_work_pool(pool, "kubernetes")
    ids = []
    for flow, entrypoint, schedules in ((retrain, "flows/retrain.py:retrain", [schedule]),
                                        (training_pipeline, "flows/pipeline.py:training_pipeline", [])):
        remote = flow.from_source(source=repository, entrypoint=entrypoint)
        ids.append(str(remote.deploy(name=f"{flow.name}-gpu", work_pool_name=pool, image=image, build=False, push=False,
                                     job_variables={"gpus": str(gpus)}, parameters={"workdir": "."},
                                     schedules=schedules, concurrency_limit=ONE_AT_A_TIME, paused=False,
                                     print_next_steps=False, tags=["multitag", "gpu"],
                                     description=f"{flow.name} on GPU pods, workspace {repository}")))
    return ids


def serve(workdir: Path, interval: float | None = None, name: str = DEPLOYMENT) -> None:
    """Run the schedule and its runs in this process (single machine, no worker)."""
    workdir = workdir.resolve()
    schedule, _ = _schedule(workdir, interval)
    retrain.serve(name=name, schedules=[schedule], global_limit=ONE_AT_A_TIME, limit=1, paused=False,
                  parameters={"workdir": str(workdir)}, tags=["multitag"])


def deploy_workspace(workdir: Path, pool_type: str = "process", interval: float | None = None, name: str = DEPLOYMENT,
                     image: str | None = None, repository: str | None = None, pool: str = "multitag-gpu",
                     gpus: int = 1) -> str:
    """`multitag deploy`: the deployments of ``pool_type`` (process: `retrain` on this machine's work
    pool; kubernetes: `retrain` and `training-pipeline` on GPU pods). Returns what to tell the user."""
    said = _deploy(workdir, pool_type, interval, name, image, repository, pool, gpus)
    alerts = set_up_alerts(load_params(workdir / "params.yaml").retrain)
    return said + (f"; alerts: {', '.join(alerts)}" if alerts else
                   "; no alerts (set retrain.alert_webhook or retrain.alert_block)")


def _deploy(workdir: Path, pool_type: str, interval: float | None, name: str, image: str | None,
            repository: str | None, pool: str, gpus: int) -> str:
    if pool_type == "kubernetes":
        if not image or not repository:
            raise ValueError("--pool-type kubernetes needs --image (built from infra/Dockerfile) and --repository "
                             "(the workspace's git URL)")
        ids = deploy_kubernetes(workdir, repository, image, pool, gpus, interval)
        return (f"deployments retrain/retrain-gpu and training-pipeline/training-pipeline-gpu ({', '.join(ids)}) "
                f"on Kubernetes work pool {pool!r}; start its worker in the cluster: prefect worker start "
                f"--pool {pool} --type kubernetes")
    if pool_type != "process":
        raise ValueError(f"--pool-type: unknown {pool_type!r}; choose process or kubernetes")
    deployment = deploy(workdir, interval, name)
    p = load_params(workdir / "params.yaml").retrain
    return (f"deployment retrain/{name} ({deployment}) on work pool {p.work_pool!r}, "
            + (f"every {interval:g} s" if interval else f"cron {p.cron!r} {p.timezone}")
            + f"; start a worker with: multitag worker --workdir {workdir}; run it now (the worker picks it up): "
            f"prefect deployment run retrain/{name}")
