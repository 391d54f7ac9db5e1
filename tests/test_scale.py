"""Past one machine, with the engines' own processes on loopback: a `dask scheduler` and two `dask
worker`s for ingest and predict (a worker killed midway, an unreachable scheduler), two `torchrun`
launches as two nodes (and one whose partner never comes), the Kubernetes work pool's Job and the
multi-node training Job rendered and validated against the kubernetes client's models, and the
training Job followed through the states a real API answers."""

import asyncio
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from multitag.config import ComputeParams, IngestParams, parse_params
from multitag.errors import ComputeError
from multitag.ingest import ingest
from multitag.layout import Layout
from tests.conftest import BIN, ROOT, copy_data, free_port, run, stop_process_group, tiny_params

pytestmark = pytest.mark.slow


def start_dask(folder, workers: int = 2, env: dict | None = None):
    """`dask scheduler` and ``workers`` `dask worker` processes on loopback TCP, started in ``folder``
    (not the workspace, as on a cluster) with no AWS credentials; (address, scheduler, workers)."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    folder.mkdir(parents=True, exist_ok=True)
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env = {**base, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_SHARED_CREDENTIALS_FILE": str(folder / "none"),
           "AWS_CONFIG_FILE": str(folder / "none"), **(env or {})}
    scheduler = subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                  "--no-dashboard"], cwd=folder, env=env, stdout=(folder / "s.log").open("w"),
                                 stderr=subprocess.STDOUT, start_new_session=True)
    procs = [start_worker(address, folder, f"w{i}", env) for i in range(workers)]
    wait_for_workers(address, workers, folder / "s.log")
    return address, scheduler, procs


def start_worker(address: str, folder, name: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "dask"), "worker", address, "--nthreads", "1", "--no-dashboard", "--name", name],
                            cwd=folder, env=env, stdout=(folder / f"{name}.log").open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_for_workers(address: str, n: int, log) -> None:
    from distributed import Client
    deadline = time.time() + 60
    while True:
        try:
            with Client(address, timeout=3) as c:
                if len(c.scheduler_info()["workers"]) == n:
                    return
        except OSError:
            pass
        if time.time() > deadline:
            raise RuntimeError("the Dask cluster did not start: " + log.read_text()[-2000:])
        time.sleep(0.5)


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    """A Dask cluster of two workers; yields (address, workers, the folder they were started in)."""
    folder = tmp_path_factory.mktemp("dask")
    address, scheduler, workers = start_dask(folder)
    yield address, workers, folder
    for proc in (*workers, scheduler):
        stop_process_group(proc)


def _photos(folder, n=160, shape=(96, 128)):
    (folder / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 255, (*shape, 3), dtype=np.uint8)).save(folder / "images" / f"{i}.jpg")
        rows.append((f"{i}.jpg", " ".join(sorted(rng.choice(list("abc"), rng.integers(0, 3), replace=False)))))
    rows.append(("missing.jpg", "a"))
    pd.DataFrame(rows, columns=["image_name", "tags"]).to_csv(folder / "labels.csv", index=False)
    return IngestParams(annotations=str(folder / "labels.csv"), images=str(folder / "images"), image_size=16)


def _files(layout):
    return {p.relative_to(layout.root).as_posix(): p.read_bytes() for p in sorted(layout.root.rglob("*"))
            if p.is_file() and ".multitag" not in p.parts}


def test_ingest_on_a_dask_cluster_equals_the_local_one_even_when_a_worker_dies(dask_cluster, tmp_path, monkeypatch):
    address, workers, _ = dask_cluster
    _photos(tmp_path / "data")
    monkeypatch.chdir(tmp_path)  # relative paths, as params.yaml has them: the workers run in another folder
    p = IngestParams(annotations="data/labels.csv", images="data/images", image_size=16)
    local, cluster, survived = (Layout(tmp_path / name) for name in ("local", "cluster", "survived"))
    ingest(p, local)
    ingest(p, cluster, compute=ComputeParams(dask=address, chunk=8))
    assert _files(cluster) == _files(local)  # shards, manifest and reports byte for byte

    killer = threading.Timer(0.5, lambda: os.killpg(workers[0].pid, signal.SIGKILL))
    killer.start()  # mid-ingest (20 tasks of 8 images): the other worker takes over the lost ones
    ingest(p, survived, compute=ComputeParams(dask=address, chunk=8))
    killer.join()
    assert workers[0].wait(10) == -signal.SIGKILL
    assert _files(survived) == _files(local)


def _missing_file(chunk):
    return open(chunk[0], "rb").read()


def test_the_work_s_own_errors_on_the_workers_are_theirs_and_not_retried(dask_cluster, tmp_path, s3_bucket):
    import boto3

    from multitag.compute import executor, map_chunks
    from multitag.errors import ClusterError, exit_code

    address, _, _ = dask_cluster
    compute = ComputeParams(dask=address)
    with executor(compute) as client, pytest.raises(ClusterError) as err:
        list(map_chunks(_missing_file, [str(tmp_path / "nowhere.jpg")], client, 1, compute))
    assert f"on the workers of the Dask cluster at {address}: FileNotFoundError" in str(err.value)
    assert "same path as this machine" in str(err.value) and exit_code(err.value) == 1  # not EXIT_TRANSIENT

    p = _photos(tmp_path / "data", n=4)  # this machine has AWS credentials (s3_bucket), the workers none
    for f in (tmp_path / "data/images").iterdir():
        boto3.client("s3").upload_file(str(f), s3_bucket, f"images/{f.name}")
    p = p.model_copy(update={"images": f"s3://{s3_bucket}/images"})
    ws = Layout(tmp_path / "ws")
    with pytest.raises(ClusterError, match="on the workers of the Dask cluster.*no usable AWS credentials.*"
                                           "the workers need their own AWS credentials"):
        ingest(p, ws, compute=compute)
    assert not ws.prepared.exists()
    ingest(p, Layout(tmp_path / "here"))  # this machine reads them


def test_a_cluster_that_loses_its_workers_or_its_scheduler_ends_the_run_in_one_paragraph(tmp_path, capfd, caplog):
    address, scheduler, [worker] = start_dask(tmp_path / "dask", workers=1)
    _photos(tmp_path / "data", n=60, shape=(1200, 1600))  # slow enough to decode for the faults to come midway
    p = IngestParams(annotations=str(tmp_path / "data/labels.csv"), images=str(tmp_path / "data/images"),
                     image_size=16)
    compute = ComputeParams(dask=address, chunk=2, worker_wait_s=3)

    def on_progress(kill):  # the fault comes once the first results are in
        class Fault(logging.Handler):
            def emit(self, record):
                if "chunks of" in record.getMessage():
                    kill()
        return Fault()

    caplog.set_level(logging.INFO, "multitag.ingest")  # its progress lines
    ingest_log = logging.getLogger("multitag.ingest")
    fault = on_progress(lambda: worker.poll() is None and os.killpg(worker.pid, signal.SIGKILL))
    ingest_log.addHandler(fault)
    start = time.time()
    try:
        with pytest.raises(ComputeError, match=f"no Dask worker has been connected to the scheduler at {address} for "
                                               "3 s \\(compute.worker_wait_s\\)"):
            ingest(p, Layout(tmp_path / "alone"), compute=compute)
        waited = time.time() - start
        worker = start_worker(address, tmp_path / "dask", "w1", None)
        wait_for_workers(address, 1, tmp_path / "dask/s.log")
        ingest_log.removeHandler(fault)
        fault = on_progress(lambda: scheduler.poll() is None and os.killpg(scheduler.pid, signal.SIGKILL))
        ingest_log.addHandler(fault)
        capfd.readouterr()
        with pytest.raises(ComputeError, match=f"the Dask cluster at {address} went away midway"):
            ingest(p, Layout(tmp_path / "lost"), compute=compute)
        assert "Traceback" not in capfd.readouterr().err  # distributed's own tracebacks are not shown
    finally:
        ingest_log.removeHandler(fault)
        for proc in (worker, scheduler):
            stop_process_group(proc)
    assert waited < 60  # a run with no worker ends (Dask alone waits forever)
    assert not (tmp_path / "alone/data/prepared").exists() and not (tmp_path / "lost/data/prepared").exists()


def test_an_unreachable_scheduler_is_named_before_any_work(tmp_path):
    p = _photos(tmp_path / "data", n=4)
    ws = Layout(tmp_path / "ws")
    address = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(ComputeError, match=f"cannot reach the Dask scheduler at {address}.*`dask scheduler` runs there"):
        ingest(p, ws, compute=ComputeParams(dask=address))
    assert not ws.prepared.exists() and not ws.ingest_summary.exists()


def test_predict_on_a_dask_cluster_equals_the_local_one(dask_cluster, tmp_path, monkeypatch):
    from multitag.models import build_model, save_model_file
    from multitag.predict import predict_folder
    from multitag.storage import LocalStore

    address, _, _ = dask_cluster
    _photos(tmp_path / "data", n=40)
    (tmp_path / "data/images/bad.jpg").write_bytes(b"junk")
    save_model_file(tmp_path / "m.pt", arch="compact_cnn", labels=list("abc"), image_size=16,
                    state_dict=build_model("compact_cnn", 3, 16).state_dict())
    store = LocalStore(tmp_path / "store")
    monkeypatch.chdir(tmp_path)  # a relative folder: the workers run in another one
    args = ("data/images", str(tmp_path / "m.pt"), store, "m")
    predict_folder(*args, tmp_path / "local.csv")
    out = predict_folder(*args, tmp_path / "cluster.parquet", compute=ComputeParams(dask=address, chunk=7))
    assert out["failed"] == 1 and out["predicted"] == 40
    local = pd.read_csv(tmp_path / "local.csv", keep_default_na=False)
    cluster = pd.read_parquet(tmp_path / "cluster.parquet")
    assert local["image"].tolist() == cluster["image"].tolist()
    assert np.abs(local["p_a"].replace("", np.nan).astype(float) - cluster["p_a"].astype(float)).max() < 1e-5


def test_the_review_s_fold_models_train_as_tasks_on_the_cluster(dask_cluster, data, tmp_path, caplog):
    from multitag.review import review

    address, _, _ = dask_cluster
    recipe = {**tiny_params(), "review": {"enabled": True, "folds": 2},
              "train": {"model": "simple_cnn", "epochs": 2, "batch_size": 16, "device": "cpu"}}
    here = review(parse_params(recipe), data)
    table = pd.read_csv(data.label_issues, keep_default_na=False)
    with caplog.at_level("INFO", logger="multitag.review"):
        cluster = review(parse_params({**recipe, "compute": {"dask": address}}), data)
    assert len(re.findall(r"review fold model \d/4: scored \d+ images \(trained on the Dask worker tcp://", caplog.text)) == 4
    assert cluster == here  # the same fold models: the same flags and held-out mAP
    on_cluster = pd.read_csv(data.label_issues, keep_default_na=False)
    assert on_cluster["sha256"].tolist() == table["sha256"].tolist()
    assert np.abs(on_cluster["quality"] - table["quality"]).max() < 1e-3


def test_workers_that_run_other_code_are_refused_with_the_versions_named(dask_cluster, tmp_path):
    from multitag.compute import executor
    from multitag.errors import ClusterError

    address, _, folder = dask_cluster
    other = tmp_path / "checkout"
    shutil.copytree(ROOT / "multitag", other / "multitag")
    with (other / "multitag/metrics.py").open("a") as f:
        f.write("\n# another checkout of the same version\n")
    from distributed import Client
    with Client(address, timeout=5) as c:
        workers = len(c.nthreads())
    odd = start_worker(address, folder, "odd", {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                                                 "PYTHONPATH": str(other)})
    try:
        wait_for_workers(address, workers + 1, folder / "odd.log")
        with pytest.raises(ClusterError, match=r"runs other versions than this machine.*: multitag 0\.1\.0 "
                                               r"\(code \w+\) \(here 0\.1\.0 \(code \w+\)\)"):
            with executor(ComputeParams(dask=address)):
                pass
    finally:
        stop_process_group(odd)


def _nodes(data, root, store, port, **train) -> list:
    """Two workspaces with the same data and params: two machines about to train as two nodes,
    with the default model (BatchNorm), meeting at 127.0.0.1:port, sharing the store ``store``."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["store"]["uri"] = str(store)
    params["train"].update({"epochs": 4, "batch_size": 8, "device": "cpu", "nodes": 2, "rdzv_id": "test",
                            "rdzv_endpoint": f"127.0.0.1:{port}", "join_timeout_s": 60, **train})
    assert params["train"]["model"] == "compact_cnn"
    nodes = [copy_data(data, root / f"node{i}") for i in range(2)]
    for ws in nodes:
        (ws.root / "params.yaml").write_text(yaml.safe_dump(params))
    return nodes


def _start_nodes(nodes) -> list[subprocess.Popen]:
    """`multitag stage train` on each node; the second one started is the one told to write
    (MULTITAG_NODE_RANK=0), though torchrun ranks the node that joins first as rank 0. Each starts
    with SIGINT at its default, as a scheduler starts a job: a suite started in the background from a
    non-interactive shell (`pytest &`) ignores SIGINT, every process it starts inherits that, and the
    nodes then trained on through the interruption below."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    default_sigint = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                      "os.execv(sys.argv[1], sys.argv[1:])")
    procs = []
    for i, ws in enumerate(nodes):
        procs.append(subprocess.Popen([sys.executable, "-c", default_sigint, str(BIN / "multitag"), "stage", "train"],
                                      cwd=ws.root, text=True, env={**env, "MULTITAG_NODE_RANK": str(1 - i)},
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        time.sleep(1)
    return procs


def _final_weights(procs) -> str:
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    shas = dict(m for log in logs for m in re.findall(r"rank (\d)/2: final weights sha256 (\w+)", log))
    assert set(shas) == {"0", "1"} and shas["0"] == shas["1"], shas  # two machines, one model
    assert "(writes the outputs)" in logs[1]
    return shas["0"]


def test_two_torchrun_nodes_train_the_default_model_to_the_same_weights_and_resume_together(data, tmp_path):
    import psutil

    # 30 epochs, no early stopping: the interruption after the first must land while training goes on (an
    # epoch of the tiny data takes 0.08 s on a fast core, and params.yaml's patience of 6 would end the run
    # a few epochs in: the tiny validation split stops improving at once)
    whole = _nodes(data, tmp_path / "whole", tmp_path / "store-whole", free_port(), epochs=30, patience=30)
    sha = _final_weights(_start_nodes(whole))
    assert [ws.model.exists() for ws in whole] == [False, True]  # the node told to write, not torchrun's rank 0

    cut = _nodes(data, tmp_path / "cut", tmp_path / "store-cut", free_port(), epochs=30, patience=30)
    procs = _start_nodes(cut)
    checkpoints = tmp_path / "store-cut/checkpoints"
    deadline = time.time() + 240
    while not (checkpoints.exists() and any(checkpoints.iterdir())) and time.time() < deadline:
        time.sleep(0.05)
    children = [c for p in procs for c in psutil.Process(p.pid).children(recursive=True)]
    assert len(children) >= 4  # each node: torchrun and its worker
    for p in procs:
        p.send_signal(signal.SIGINT)  # to `multitag stage train` alone, as a scheduler stops it
    codes = [p.wait(60) for p in procs]
    assert codes == [130, 130], [p.stdout.read()[-3000:] for p in procs]
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [c.cmdline() for c in alive]  # torchrun and its workers ended with the stage
    for ws in cut:  # a restart on other disks: the checkpoint is taken from the store
        shutil.rmtree(ws.root / ".multitag", ignore_errors=True)
    resumed = _start_nodes(cut)
    assert _final_weights(resumed) == sha  # interrupted and resumed on 2 nodes = uninterrupted
    log = json.loads((cut[1].run_log / "train.json").read_text())
    assert log["resumed_from_epoch"] >= 1 and log["start"].startswith("resumed from")


def test_a_node_whose_partner_or_rendezvous_never_comes_stops_in_time(data, tmp_path):
    for endpoint in (f"127.0.0.1:{free_port()}", "10.255.255.1:29500"):  # no partner; no host that answers
        [lonely, _] = _nodes(data, tmp_path / endpoint.replace(":", "-"), tmp_path / "store", 0, join_timeout_s=10)
        params = yaml.safe_load((lonely.root / "params.yaml").read_text())
        params["train"]["rdzv_endpoint"] = endpoint
        (lonely.root / "params.yaml").write_text(yaml.safe_dump(params))
        start = time.time()
        proc = run([str(BIN / "multitag"), "stage", "train"], lonely.root, check=False, timeout=120)
        # the 10 s wait plus starting Python, torch and torchrun, not a hang (51 s once on 2 loaded cores)
        assert proc.returncode == 1 and time.time() - start < 90, (endpoint, time.time() - start)
        assert f"the 2 nodes must all reach {endpoint}" in proc.stderr
        assert "train.join_timeout_s (10 s)" in proc.stderr


KUBERNETES_VERSIONS = ("1.28.0", "1.37.0")  # the oldest and newest minor versions supported


def _validated(manifest: dict, kind: str):
    """The manifest as the kubernetes client's typed model, and back (a key the model does not know
    would be dropped, so the round trip must give the manifest again), and against the Kubernetes
    API's own schemas, strict, for the oldest and newest versions supported."""
    import kubernetes_validate
    from kubernetes.client import ApiClient

    api = ApiClient()
    model = api.deserialize(SimpleNamespace(data=json.dumps(manifest)), kind)
    assert api.sanitize_for_serialization(model) == json.loads(json.dumps(manifest)), kind
    named = {**manifest, "metadata": {"name": "rendered", **manifest["metadata"]}}  # a generateName gets one
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(json.loads(json.dumps(named)), version, strict=True)
    return model


def _restricted(pod, container) -> None:
    """Pod Security "restricted": non-root, no privilege escalation, no capabilities, RuntimeDefault seccomp."""
    assert pod.security_context.run_as_non_root and pod.security_context.run_as_user == 10001
    assert pod.security_context.seccomp_profile.type == "RuntimeDefault"
    assert container.security_context.allow_privilege_escalation is False
    assert container.security_context.capabilities.drop == ["ALL"]


def test_the_kubernetes_work_pool_renders_a_gpu_job(prefect_server, monkeypatch):
    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    from flows.kubernetes import TEMPLATE_FILE, base_job_template

    assert json.loads(TEMPLATE_FILE.read_text()) == base_job_template()  # the file is the code's template
    monkeypatch.setenv("PREFECT_API_URL", prefect_server)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sEcReT-in-the-env-0000")
    config = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(
        base_job_template(), {"image": "registry.example.com/multitag:0.1.0", "gpus": "2",
                              "command": "prefect flow-run execute", "env": {"MULTITAG_STORE_URI": "s3://b/m"}}))
    config.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="retrain-ws-20261125"))  # as the worker does
    job = config.job_manifest
    model = _validated(job, "V1Job")
    pod = model.spec.template.spec
    [container] = pod.containers
    assert container.name == "prefect-job" and model.spec.parallelism == 1 and model.spec.completions == 1
    assert container.image == "registry.example.com/multitag:0.1.0"
    assert container.args == ["prefect", "flow-run", "execute"]
    assert {e.name: e.value for e in container.env}["MULTITAG_STORE_URI"] == "s3://b/m"
    assert container.resources.limits["nvidia.com/gpu"] == "2"
    assert container.env_from[0].secret_ref.name == "multitag-aws"
    assert {v.name: v.empty_dir.medium for v in pod.volumes} == {"dshm": "Memory"}
    assert [m.mount_path for m in container.volume_mounts] == ["/dev/shm"]
    assert pod.node_selector == {"nvidia.com/gpu.present": "true"} and pod.tolerations[0].key == "nvidia.com/gpu"
    assert "sEcReT-in-the-env-0000" not in json.dumps(job)
    _restricted(pod, container)
    assert pod.service_account_name == "multitag-flow"  # infra/kubernetes/rbac.yaml


def test_the_multi_node_training_job_renders_and_is_followed_to_its_end(tmp_path):
    from multitag.distributed import indexed_job, submit_and_follow

    params = parse_params({**tiny_params(), "store": {"uri": "s3://models/photos"},
                           "train": {"nodes": 3, "devices": 4, "launcher": "kubernetes",
                                     "kubernetes": {"image": "registry.example.com/multitag:0.1.0", "gpus": 4}}})
    job, service, config_map = indexed_job(params, "multitag-train-t1", {"dvc.yaml": "stages: {}", ".dvc/config": ""},
                                           "runs/multitag-train-t1")
    model = _validated(job, "V1Job")
    assert _validated(service, "V1Service").spec.publish_not_ready_addresses  # ranks resolve before Ready
    _validated(config_map, "V1ConfigMap")
    assert (model.spec.completion_mode, model.spec.completions, model.spec.parallelism) == ("Indexed", 3, 3)
    pod = model.spec.template.spec
    container = pod.containers[0]
    assert container.resources.limits["nvidia.com/gpu"] == "4" and service.get("spec", {})["clusterIP"] == "None"
    script = container.command[-1]
    assert "dvc pull data/prepared data/labels" in script and "--nnodes=3" in script and "--max-restarts=3" in script
    assert "--rdzv-endpoint=multitag-train-t1-0.multitag-train-t1.default.svc:29500" in script
    _restricted(pod, container)
    assert container.security_context.read_only_root_filesystem and "/tmp" in [m.mount_path for m in container.volume_mounts]
    assert pod.service_account_name == "multitag-train" and pod.automount_service_account_token is False
    spec = model.spec
    assert spec.active_deadline_seconds == 86400 and spec.ttl_seconds_after_finished == 86400 and spec.backoff_limit == 0
    evicted, failed = spec.pod_failure_policy.rules  # an evicted pod is replaced, a failed training is final
    assert (evicted.action, evicted.on_pod_conditions[0].type) == ("Ignore", "DisruptionTarget")
    assert (failed.action, failed.on_exit_codes.operator, failed.on_exit_codes.values) == ("FailJob", "NotIn", [0])

    said = []
    for ending, final in (("succeeded", "succeeded"), ("failed", "failed")):
        api = FakeKubernetes(ending)
        if final == "succeeded":
            assert submit_and_follow(api, api, job, service, config_map, said.append, poll_s=0) == "succeeded"
        else:
            with pytest.raises(RuntimeError, match="(?s)failed \\(pod multitag-train-t1-1-x\\).*CUDA error"):
                submit_and_follow(api, api, job, service, config_map, said.append, poll_s=0)
        assert [s for s in said if s.startswith("Job ")][-3:] == [f"Job multitag-train-t1: {s}" for s in
                                                                  ("pending", "running", final)]
        assert "[rank 0] epoch 1/2" in said and api.created == ["Job", "Service", "ConfigMap"]
        for obj in (service, config_map):  # deleted with the Job
            assert obj["metadata"]["ownerReferences"] == [{"apiVersion": "batch/v1", "kind": "Job",
                                                           "name": "multitag-train-t1", "uid": "uid-t1"}]
        said.clear()


class FakeKubernetes:
    """BatchV1Api + CoreV1Api as a real API answers a training Job: pending, running (rank 0 logging),
    then succeeded, or one pod failed."""

    def __init__(self, ending: str):
        self.ending, self.calls, self.created = ending, 0, []

    def create_namespaced_service(self, ns, body):
        self.created.append("Service")

    def create_namespaced_config_map(self, ns, body):
        self.created.append("ConfigMap")

    def create_namespaced_job(self, ns, body):
        self.created.append("Job")
        return SimpleNamespace(metadata=SimpleNamespace(uid="uid-t1"))

    def read_namespaced_job_status(self, name, ns):
        self.calls += 1
        status = ({} if self.calls == 1 else {"active": 3} if self.calls < 4 else
                  {"conditions": [{"type": "Complete", "status": "True"}]} if self.ending == "succeeded" else
                  {"active": 2, "failed": 1})
        return SimpleNamespace(status=status)

    def list_namespaced_pod(self, ns, label_selector):
        def pod(i, phase):
            return SimpleNamespace(metadata=SimpleNamespace(name=f"multitag-train-t1-{i}-x", annotations={
                "batch.kubernetes.io/job-completion-index": str(i)}), status=SimpleNamespace(phase=phase))
        failed = self.ending == "failed" and self.calls >= 4
        return SimpleNamespace(items=[pod(0, "Running"), pod(1, "Failed" if failed else "Running"), pod(2, "Running")])

    def read_namespaced_pod_log(self, name, ns):
        if name.endswith("-1-x"):
            return "loading\nRuntimeError: CUDA error: out of memory\n"
        return "epoch 1/2\nepoch 2/2\n"[: 10 * self.calls]


def test_kubernetes_settings_that_cannot_work_are_refused():
    from multitag.errors import ConfigError

    k8s = {"launcher": "kubernetes", "nodes": 2, "kubernetes": {"image": "i", "gpus": 8}}
    with pytest.raises(ConfigError, match=r"train.kubernetes.gpus \(8\) must equal train.devices \(1\).*7 would be idle"):
        parse_params({**tiny_params(), "store": {"uri": "s3://b/m"}, "train": k8s})
    with pytest.raises(ConfigError, match="train.launcher kubernetes needs store.uri on S3.*cannot reach a folder"):
        parse_params({**tiny_params(), "train": {**k8s, "devices": 8}})
    parse_params({**tiny_params(), "store": {"uri": "s3://b/m"}, "train": {**k8s, "devices": 8}})


def test_the_rbac_grants_exactly_the_calls_the_training_launcher_makes():
    needs = {"create_namespaced_job": ("batch", "jobs", "create"),  # each API call: (group, resource, verb)
             "read_namespaced_job_status": ("batch", "jobs/status", "get"),
             "create_namespaced_service": ("", "services", "create"),
             "create_namespaced_config_map": ("", "configmaps", "create"),
             "list_namespaced_pod": ("", "pods", "list"), "read_namespaced_pod_log": ("", "pods/log", "get")}
    calls = set(re.findall(r"\.(\w+_namespaced_\w+)\(", (ROOT / "multitag/distributed.py").read_text()))
    assert calls == set(needs)  # a new call needs its rule here and in rbac.yaml
    docs = list(yaml.safe_load_all((ROOT / "infra/kubernetes/rbac.yaml").read_text()))
    kinds = {"ServiceAccount": "V1ServiceAccount", "Role": "V1Role", "RoleBinding": "V1RoleBinding"}
    models = {(d["kind"], d["metadata"]["name"]): _validated(d, kinds[d["kind"]]) for d in docs}
    granted = {(g, r, v) for rule in models["Role", "multitag-flow"].rules for g in rule.api_groups
               for r in rule.resources for v in rule.verbs}
    assert granted == set(needs.values())  # least privilege: nothing more
    binding = models["RoleBinding", "multitag-flow"]
    assert binding.role_ref.name == "multitag-flow" and binding.subjects[0].name == "multitag-flow"
    assert models["ServiceAccount", "multitag-train"].automount_service_account_token is False


def test_tune_trains_trials_at_once_on_the_cluster_and_stops_when_it_is_lost(prefect_server, tmp_path):
    """`tune.parallel: 2` on a cluster of two workers: the trials run at once, each on a worker, as
    task runs of the tune flow; then its scheduler killed mid-trial: the tune ends with the cluster
    named, its trials failed and their recipes queued for the next tune."""
    import optuna
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.tune import tune_flow
    from multitag.config import load_params
    from multitag.layout import TUNE
    from multitag.tune import open_study, tune
    from tests.conftest import prefect_api
    from tests.test_retrain_server import wait_for
    from tests.test_tune import workspace

    ws = workspace(tmp_path / "cluster-ws", parallel=2)
    address, scheduler, workers = start_dask(tmp_path / "dask", workers=2)  # the module's lost a worker
    params = yaml.safe_load(ws.params.read_text())
    params["compute"]["dask"] = address
    ws.params.write_text(yaml.safe_dump(params, sort_keys=False))

    def kill_mid_trial():  # once a worker has begun the third trial (of 10 s)
        wait_for(lambda: list((ws.root / TUNE).glob("*/trial-002")), 120, "the third trial", 0.1)
        os.killpg(scheduler.pid, signal.SIGKILL)
    killer = threading.Thread(target=kill_mid_trial)
    try:
        with temporary_settings({PREFECT_API_URL: prefect_server}):
            result = tune_flow(workdir=str(ws.root), budget="5m", max_trials=2)
        killer.start()
        with pytest.raises(ComputeError, match=f"the Dask cluster at {address} went away midway"):
            tune(ws, "5m", max_trials=2)
    finally:
        if killer.is_alive():
            killer.join()
        for proc in (*workers, scheduler):
            stop_process_group(proc)
    assert [t["state"] for t in result["trials"]] == ["complete", "complete"]
    assert result["baseline"]["state"] == "complete" and result["best"]["test_map"] is not None
    [flow_run] = prefect_api(prefect_server, "/flow_runs/filter", {"flow_runs": {"name": {"like_": "tune cluster-ws:"}}})
    trials = sorted((t for t in prefect_api(prefect_server, "/task_runs/filter",
                                            {"flow_runs": {"id": {"any_": [flow_run["id"]]}}})
                     if t["name"].startswith("trial ")), key=lambda t: t["start_time"])
    assert len(trials) == 2 and trials[1]["start_time"] < trials[0]["end_time"]  # at once
    study = open_study(ws, load_params(ws.params).tune)
    done, lost = study.trials[:2], study.trials[2:4]
    assert sorted(t.user_attrs["worker"] for t in done) == ["w0", "w1"]
    assert all(len(t.intermediate_values) == t.user_attrs["epochs"] for t in done)  # every epoch told
    assert [t.state for t in lost] == [optuna.trial.TrialState.FAIL] * 2
    assert all(t.user_attrs["note"].startswith("interrupted: ") for t in lost)
    queued = [t.system_attrs["fixed_params"] for t in study.trials if t.state == optuna.trial.TrialState.WAITING]
    assert queued == [t.params for t in lost]  # the next tune trains them first
