"""Training past one machine: ``torchrun`` with c10d rendezvous, and, on Kubernetes, the Indexed Job
that runs it on N GPU nodes.

``train.nodes: N`` (N > 1) makes the train stage a torchrun launch that meets N-1 others at
``train.rdzv_endpoint`` (``host:port``; every node uses the same one and the same
``train.rdzv_id``), ``train.devices`` processes per node, gloo on CPU and NCCL on GPUs. A node that
never arrives, or a rendezvous host that does not answer, ends every launch with torchrun's
rendezvous error after about ``train.join_timeout_s`` instead of a hang. One process writes
checkpoints, the model and the reports: local rank 0 of the node started with
``MULTITAG_NODE_RANK=0`` (on Kubernetes, pod 0), else of the node that hosts the rendezvous endpoint
(torchrun's own rank 0 is whichever node joined first). The checkpoint of a run on several nodes is
kept in the store as well, so that after a restart every rank resumes from the same one.

On Kubernetes a Prefect flow run is one pod, so the train stage (``train.launcher: kubernetes``)
submits an Indexed Job of ``train.nodes`` pods behind a headless Service (pod 0's DNS name is the
rendezvous endpoint), follows it (its status and rank 0's log go into the task's log; a failed pod
fails the stage), and takes the outputs rank 0 uploaded to the store. Each pod gets the data the DVC
way (``dvc pull`` of the prepared shards and labels from the DVC remote): no node needs the raw
images.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from typing import Callable

from multitag.config import Params

log = logging.getLogger(__name__)

JOB_PORT = 29500
MAX_RESTARTS = 3  # on Kubernetes: new rendezvous rounds after a pod is evicted or preempted
# Where GPU pods go: the label the NVIDIA GPU operator puts on GPU nodes, and the toleration of their taint
# (the defaults of the flow-run work pool's template too, flows/kubernetes.py).
GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
# Pod Security "restricted": the image's non-root user (infra/Dockerfile), no privilege escalation, no
# capabilities, the runtime's seccomp profile (also the flow-run pods', flows/kubernetes.py).
IMAGE_USER = 10001
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": IMAGE_USER, "runAsGroup": IMAGE_USER, "fsGroup": IMAGE_USER,
                "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
OUTPUTS = ["models/model.pt", "reports/train.json", "reports/train_history.csv"]  # what rank 0 uploads
UPLOAD_ENV = "MULTITAG_UPLOAD"  # set on Kubernetes training pods: where the writer puts its outputs
NODE_RANK_ENV = "MULTITAG_NODE_RANK"  # which node writes the outputs: the one where it is 0


def needs_launch(t) -> bool:
    """Whether the train stage must start other processes (torchrun, or a Kubernetes Job) rather than
    train here: several devices or nodes asked for, and this is not already one of torchrun's workers."""
    return "WORLD_SIZE" not in os.environ and (t.devices > 1 or t.nodes > 1)


def launch(params: Params, layout) -> None:
    """The train stage on several processes: an Indexed Job on Kubernetes (train.launcher), or a
    torchrun launch of this node, each of whose processes runs the train stage."""
    t = params.train
    if t.launcher == "kubernetes" and t.nodes > 1:
        return run_on_kubernetes(params, layout)
    # not subprocess.call: on Ctrl-C it kills torchrun at once, which leaves torchrun's workers running;
    # the CLI ends them all (multitag.cli._terminate_children)
    code = subprocess.Popen(torchrun_command(params, str(layout.root))).wait()
    if code:
        where = (f"; the {t.nodes} nodes must all reach {t.rdzv_endpoint} (rdzv_id {t.rdzv_id}) within "
                 f"train.join_timeout_s ({t.join_timeout_s:g} s)") if t.nodes > 1 else ""
        raise RuntimeError(f"train: torchrun exited with {code}{where} (its own error is above)")
    return None


def upload_outputs(store, layout) -> None:
    """On a Kubernetes training pod ($MULTITAG_UPLOAD set), the writer puts the training outputs in
    the store, for the train stage that submitted the Job to take."""
    prefix = os.environ.get(UPLOAD_ENV)
    if not prefix:
        return
    for out in OUTPUTS:
        store.put_file(f"{prefix}/{out}", layout.root / out)
    log.info("uploaded the training outputs to %s", store.url(prefix))


def node_rank(endpoint: str | None) -> int:
    """This node's rank in choosing which node writes: $MULTITAG_NODE_RANK, else the pod's index in
    an Indexed Job, else 0 on the machine that hosts the rendezvous endpoint and 1 on the others."""
    for var in (NODE_RANK_ENV, "JOB_COMPLETION_INDEX"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0 if endpoint and _is_this_machine(endpoint.rpartition(":")[0]) else 1


def _is_this_machine(host: str) -> bool:
    try:
        address = socket.gethostbyname(host)
        with socket.socket() as s:
            s.bind((address, 0))  # only an address of this machine can be bound
        return True
    except OSError:
        return False


def writer_rank(endpoint: str | None) -> int:
    """The global rank that writes checkpoints, the model and the reports: local rank 0 of the node
    of lowest node_rank (ties: the lower global rank). torchrun gives rank 0 to whichever node joins
    first; this does not depend on it. Every rank must call it (a collective)."""
    import torch.distributed as dist

    mine = (node_rank(endpoint), int(os.environ.get("LOCAL_RANK", "0")), dist.get_rank())
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return min(everyone)[2]


def torchrun_command(params: Params, workdir: str, module: str = "multitag.cli", max_restarts: int = 0) -> list[str]:
    """The torchrun launch of one node of a multi-node (or multi-device) training; ``max_restarts``:
    rounds torchrun's agent starts again when a node is lost (its workers resume from the checkpoint)."""
    t = params.train
    if t.nodes > 1:
        if not t.rdzv_endpoint:
            raise ValueError("train.rdzv_endpoint: set host:port, the same on every node, to train on "
                             f"{t.nodes} nodes")
        where = [f"--nnodes={t.nodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={t.rdzv_endpoint}",
                 f"--rdzv-id={t.rdzv_id}",
                 # the whole join, reaching the endpoint's store included (its own default is 60 s)
                 f"--rdzv-conf=join_timeout={int(t.join_timeout_s)},read_timeout={int(t.join_timeout_s)}"]
    else:
        where = ["--standalone"]
    if max_restarts:
        where.append(f"--max-restarts={max_restarts}")
    return [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc-per-node={t.devices}",
            "-m", module, "stage", "train", "--workdir", workdir]


def indexed_job(params: Params, name: str, files: dict[str, str], upload: str) -> tuple[dict, dict, dict]:
    """(Job, headless Service, ConfigMap) of a multi-node training: ``train.nodes`` pods, completion
    mode Indexed; each puts the workspace's DVC files (``files``: dvc.yaml, dvc.lock, params, the DVC
    remote's config) in place, pulls the prepared data with DVC and runs one torchrun node; the
    writer (pod 0) uploads OUTPUTS under ``upload`` in the store.

    The pods meet the Pod Security "restricted" profile with a read-only root file system (they
    write only to /tmp and /dev/shm). A pod evicted or preempted is replaced and torchrun's agents on
    the others start a new round (``--max-restarts``), resuming from the checkpoint in the store; a
    training process that fails fails the Job (podFailurePolicy). The Service and ConfigMap are
    owned by the Job (submit_and_follow), so they go with it."""
    t, k = params.train, params.train.kubernetes
    if not k.image:
        raise ValueError("train.kubernetes.image: name the image built from infra/Dockerfile")
    namespace = k.namespace
    service = {"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": name, "namespace": namespace, "labels": {"app": "multitag", "job-name": name}},
               "spec": {"clusterIP": "None", "selector": {"job-name": name}, "publishNotReadyAddresses": True,
                        "ports": [{"name": "rendezvous", "port": JOB_PORT}]}}
    node = params.model_copy(update={"train": t.model_copy(update={
        "rdzv_endpoint": f"{name}-0.{name}.{namespace}.svc:{JOB_PORT}", "rdzv_id": name})})
    launch = " ".join(torchrun_command(node, ".", "multitag.cli", MAX_RESTARTS)[1:])  # -m torch.distributed.run ...
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": namespace},
                  "data": {key.replace("/", "__"): text for key, text in files.items()}}
    script = ("set -e; mkdir -p /tmp/ws/.dvc && cd /tmp/ws; "
              + "; ".join(f"cp /config/{key.replace('/', '__')} {key}" for key in files)
              + "; dvc pull data/prepared data/labels; exec python " + launch)
    container = {
        "name": "train", "image": k.image, "command": ["/bin/sh", "-c", script],
        "ports": [{"containerPort": JOB_PORT, "name": "rendezvous"}],
        "envFrom": [{"secretRef": {"name": k.aws_secret}}],
        "env": [{"name": "DO_NOT_TRACK", "value": "1"}, {"name": "DVC_NO_ANALYTICS", "value": "1"},
                {"name": "HOME", "value": "/tmp"}, {"name": UPLOAD_ENV, "value": upload}],
        "resources": {"limits": {"nvidia.com/gpu": str(k.gpus)}, "requests": {"cpu": "4", "memory": "16Gi"}},
        "securityContext": {**CONTAINER_SECURITY, "readOnlyRootFilesystem": True},
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"},
                         {"name": "workspace", "mountPath": "/config"}],
    }
    job = {"apiVersion": "batch/v1", "kind": "Job",
           "metadata": {"name": name, "namespace": namespace, "labels": {"app": "multitag"}},
           "spec": {"completionMode": "Indexed", "completions": t.nodes, "parallelism": t.nodes,
                    "backoffLimit": 0, "activeDeadlineSeconds": k.deadline_s,
                    "ttlSecondsAfterFinished": k.keep_finished_s,
                    "podFailurePolicy": {"rules": [
                        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                        {"action": "FailJob", "onPodConditions": [],  # required (empty) by Kubernetes 1.28
                         "onExitCodes": {"containerName": "train", "operator": "NotIn", "values": [0]}}]},
                    "template": {"metadata": {"labels": {"app": "multitag", "job-name": name}},
                                 "spec": {"subdomain": name, "restartPolicy": "Never", "containers": [container],
                                          "serviceAccountName": k.service_account,
                                          "automountServiceAccountToken": False,
                                          "securityContext": dict(POD_SECURITY),
                                          "nodeSelector": dict(GPU_NODE_SELECTOR),
                                          "tolerations": [dict(t) for t in GPU_TOLERATIONS],
                                          "volumes": [{"name": "dshm",
                                                       "emptyDir": {"medium": "Memory", "sizeLimit": k.shm_size}},
                                                      {"name": "tmp", "emptyDir": {}},
                                                      {"name": "workspace", "configMap": {"name": name}}]}}}}
    return job, service, config_map


def workspace_files(layout) -> dict[str, str]:
    """What a training pod needs of the workspace to `dvc pull` its data: the DVC files and params,
    and the DVC config without git (the pod has no repository)."""
    root = layout.root
    files = {name: (root / name).read_text() for name in ("dvc.yaml", "dvc.lock", "params.yaml", "lineage.yaml")}
    files[".dvc/config"] = (root / ".dvc/config").read_text() + "\n[core]\n    no_scm = true\n"
    return files


def run_on_kubernetes(params: Params, layout) -> None:
    """Train on an Indexed Job of train.nodes pods: push the prepared data to the DVC remote, submit,
    follow (status and rank 0's log in this stage's log), then take rank 0's outputs from the store."""
    import uuid

    from kubernetes import client, config

    from multitag.storage import open_store

    code = subprocess.call([sys.executable, "-m", "dvc", "push", "data/prepared", "data/labels"], cwd=layout.root)
    if code:
        raise RuntimeError("train: `dvc push data/prepared data/labels` failed; the training pods pull their data "
                           "from the DVC remote (multitag remote setup URL)")
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    name = f"multitag-train-{uuid.uuid4().hex[:8]}"
    store = open_store(params.store.uri, layout.root)
    job, service, config_map = indexed_job(params, name, workspace_files(layout), f"runs/{name}")
    submit_and_follow(client.BatchV1Api(), client.CoreV1Api(), job, service, config_map, log.info,
                      timeout_s=params.train.kubernetes.deadline_s + 600)
    for out in OUTPUTS:
        store.get_file(f"runs/{name}/{out}", layout.root / out)
    log.info("took the outputs of %s from %s", name, store.url(f"runs/{name}"))


def job_state(status) -> str:
    """pending | running | succeeded | failed, from a V1JobStatus (or its dict)."""
    get = (lambda k: status.get(k)) if isinstance(status, dict) else (lambda k: getattr(status, k, None))
    if get("failed"):
        return "failed"
    if any((c.get("type") if isinstance(c, dict) else c.type) == "Complete" and
           (c.get("status") if isinstance(c, dict) else c.status) == "True" for c in get("conditions") or []):
        return "succeeded"
    return "running" if get("active") else "pending"


def submit_and_follow(batch_api, core_api, job: dict, service: dict, config_map: dict, say: Callable[[str], None],
                      poll_s: float = 5.0, timeout_s: float = 24 * 3600) -> str:
    """Create the Job, then its Service and ConfigMap owned by it (Kubernetes deletes them with the
    Job; its pods wait for the ConfigMap), then follow the Job until it succeeds (returned) or fails
    (RuntimeError naming the pod and its last log lines); every change of state and rank 0's new log
    lines go to ``say``. ``batch_api`` / ``core_api``: the kubernetes client's BatchV1Api and
    CoreV1Api (or anything with the same methods)."""
    ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
    created = batch_api.create_namespaced_job(ns, job)
    # (no blockOwnerDeletion: it would need the right to update jobs/finalizers too)
    owner = [{"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": created.metadata.uid}]
    for obj in (service, config_map):
        obj["metadata"]["ownerReferences"] = owner
    core_api.create_namespaced_service(ns, service)
    core_api.create_namespaced_config_map(ns, config_map)
    say(f"submitted Job {ns}/{name}: {job['spec']['completions']} nodes")
    state, seen, deadline = None, 0, time.time() + timeout_s
    while time.time() < deadline:
        current = job_state(batch_api.read_namespaced_job_status(name, ns).status)
        if current != state:
            say(f"Job {name}: {current}")
            state = current
        pods = core_api.list_namespaced_pod(ns, label_selector=f"job-name={name}").items
        rank0 = [p for p in pods if (p.metadata.annotations or {}).get("batch.kubernetes.io/job-completion-index") == "0"]
        if rank0 and state in ("running", "succeeded", "failed"):
            lines = core_api.read_namespaced_pod_log(rank0[0].metadata.name, ns).splitlines()
            for line in lines[seen:]:
                say(f"[rank 0] {line}")
            seen = len(lines)
        if state == "succeeded":
            return state
        if state == "failed":
            failed = [p.metadata.name for p in pods if p.status.phase == "Failed"]
            tail = core_api.read_namespaced_pod_log(failed[0], ns).splitlines()[-10:] if failed else []
            raise RuntimeError(f"training Job {ns}/{name} failed (pod {failed[0] if failed else '?'}):\n"
                               + "\n".join(tail))
        time.sleep(poll_s)
    raise TimeoutError(f"training Job {ns}/{name} did not finish within {timeout_s:.0f} s")
