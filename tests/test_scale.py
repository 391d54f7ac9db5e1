"""Past one machine, with the engines' own processes on loopback: a `dask scheduler` and two `dask
worker`s for ingest and predict (a worker killed midway, an unreachable scheduler), two `torchrun`
launches as two nodes (and one whose partner never comes), the Kubernetes work pool's Job and the
multi-node training Job rendered and validated against the kubernetes client's models, and the
training Job followed through the states a real API answers."""

import asyncio
import json
import os
import re
import signal
import subprocess
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


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    """`dask scheduler` and two `dask worker` processes on loopback TCP; yields (address, workers)."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("dask")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    scheduler = subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                  "--no-dashboard"], env=env, stdout=(log / "s.log").open("w"),
                                 stderr=subprocess.STDOUT, start_new_session=True)
    workers = [subprocess.Popen([str(BIN / "dask"), "worker", address, "--nthreads", "1", "--no-dashboard",
                                 "--name", f"w{i}"], env=env, stdout=(log / f"w{i}.log").open("w"),
                                stderr=subprocess.STDOUT, start_new_session=True) for i in range(2)]
    from distributed import Client
    deadline = time.time() + 60
    while True:
        try:
            with Client(address, timeout=3) as c:
                if len(c.scheduler_info()["workers"]) == 2:
                    break
        except OSError:
            pass
        if time.time() > deadline:
            raise RuntimeError("the Dask cluster did not start: " + (log / "s.log").read_text()[-2000:])
        time.sleep(0.5)
    yield address, workers
    for proc in (*workers, scheduler):
        stop_process_group(proc)


def _photos(folder, n=160):
    (folder / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(folder / "images" / f"{i}.jpg")
        rows.append((f"{i}.jpg", " ".join(sorted(rng.choice(list("abc"), rng.integers(0, 3), replace=False)))))
    rows.append(("missing.jpg", "a"))
    pd.DataFrame(rows, columns=["image_name", "tags"]).to_csv(folder / "labels.csv", index=False)
    return IngestParams(annotations=str(folder / "labels.csv"), images=str(folder / "images"), image_size=16)


def _files(layout):
    return {p.relative_to(layout.root).as_posix(): p.read_bytes() for p in sorted(layout.root.rglob("*"))
            if p.is_file() and ".multitag" not in p.parts}


def test_ingest_on_a_dask_cluster_equals_the_local_one_even_when_a_worker_dies(dask_cluster, tmp_path):
    address, workers = dask_cluster
    p = _photos(tmp_path / "data")
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


def test_an_unreachable_scheduler_is_named_before_any_work(tmp_path):
    p = _photos(tmp_path / "data", n=4)
    ws = Layout(tmp_path / "ws")
    address = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(ComputeError, match=f"cannot reach the Dask scheduler at {address}.*`dask scheduler` runs there"):
        ingest(p, ws, compute=ComputeParams(dask=address))
    assert not ws.prepared.exists() and not ws.ingest_summary.exists()


def test_predict_on_a_dask_cluster_equals_the_local_one(dask_cluster, tmp_path):
    from multitag.models import build_model, save_model_file
    from multitag.predict import predict_folder
    from multitag.storage import LocalStore

    address, _ = dask_cluster
    _photos(tmp_path / "data", n=40)
    (tmp_path / "data/images/bad.jpg").write_bytes(b"junk")
    save_model_file(tmp_path / "m.pt", arch="compact_cnn", labels=list("abc"), image_size=16,
                    state_dict=build_model("compact_cnn", 3, 16).state_dict())
    store = LocalStore(tmp_path / "store")
    args = (tmp_path / "data/images", str(tmp_path / "m.pt"), store, "m")
    predict_folder(*args, tmp_path / "local.csv")
    out = predict_folder(*args, tmp_path / "cluster.parquet", compute=ComputeParams(dask=address, chunk=7))
    assert out["failed"] == 1 and out["predicted"] == 40
    local = pd.read_csv(tmp_path / "local.csv", keep_default_na=False)
    cluster = pd.read_parquet(tmp_path / "cluster.parquet")
    assert local["image"].tolist() == cluster["image"].tolist()
    assert np.abs(local["p_a"].replace("", np.nan).astype(float) - cluster["p_a"].astype(float)).max() < 1e-5


def test_two_torchrun_nodes_train_the_same_weights_and_a_lonely_node_stops_in_time(data, tmp_path):
    port = free_port()
    nodes = [copy_data(data, tmp_path / f"node{i}") for i in range(2)]
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update(model="simple_cnn", epochs=2, batch_size=8, device="cpu", nodes=2,
                           rdzv_endpoint=f"127.0.0.1:{port}", rdzv_id="test", join_timeout_s=60)
    for ws in nodes:
        (ws.root / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([str(BIN / "multitag"), "stage", "train"], cwd=ws.root, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for ws in nodes]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    shas = dict(m for log in logs for m in re.findall(r"rank (\d)/2: final weights sha256 (\w+)", log))
    assert set(shas) == {"0", "1"} and shas["0"] == shas["1"]  # two machines, one model
    assert sum(ws.model.exists() for ws in nodes) == 1  # rank 0 alone wrote it

    lonely = copy_data(data, tmp_path / "lonely")
    params["train"].update(rdzv_endpoint=f"127.0.0.1:{free_port()}", join_timeout_s=10)
    (lonely.root / "params.yaml").write_text(yaml.safe_dump(params))
    start = time.time()
    proc = run([str(BIN / "multitag"), "stage", "train"], lonely.root, check=False, timeout=120)
    assert proc.returncode == 1 and time.time() - start < 90
    assert "the 2 nodes must all reach 127.0.0.1" in proc.stderr and "train.join_timeout_s (10 s)" in proc.stderr


def _validated(manifest: dict, kind: str):
    """The manifest as the kubernetes client's typed model, and back: a key the model does not know
    would be dropped, so the round trip must give the manifest again."""
    from kubernetes.client import ApiClient

    api = ApiClient()
    model = api.deserialize(SimpleNamespace(data=json.dumps(manifest)), kind)
    assert api.sanitize_for_serialization(model) == json.loads(json.dumps(manifest)), kind
    return model


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


def test_the_multi_node_training_job_renders_and_is_followed_to_its_end(tmp_path):
    from multitag.distributed import indexed_job, submit_and_follow

    params = parse_params({**tiny_params(), "train": {"nodes": 3, "launcher": "kubernetes",
                                                      "kubernetes": {"image": "registry.example.com/multitag:0.1.0",
                                                                     "gpus": 4}}})
    job, service, config_map = indexed_job(params, "multitag-train-t1", {"dvc.yaml": "stages: {}", ".dvc/config": ""},
                                           "runs/multitag-train-t1")
    model = _validated(job, "V1Job")
    _validated(service, "V1Service")
    _validated(config_map, "V1ConfigMap")
    assert (model.spec.completion_mode, model.spec.completions, model.spec.parallelism) == ("Indexed", 3, 3)
    container = model.spec.template.spec.containers[0]
    assert container.resources.limits["nvidia.com/gpu"] == "4" and service.get("spec", {})["clusterIP"] == "None"
    script = container.command[-1]
    assert "dvc pull data/prepared data/labels" in script and "--nnodes=3" in script
    assert "--rdzv-endpoint=multitag-train-t1-0.multitag-train-t1.default.svc:29500" in script

    said = []
    for ending, final in (("succeeded", "succeeded"), ("failed", "failed")):
        api = FakeKubernetes(ending)
        if final == "succeeded":
            assert submit_and_follow(api, api, job, service, said.append, poll_s=0) == "succeeded"
        else:
            with pytest.raises(RuntimeError, match="(?s)failed \\(pod multitag-train-t1-1-x\\).*CUDA error"):
                submit_and_follow(api, api, job, service, said.append, poll_s=0)
        assert [s for s in said if s.startswith("Job ")][-3:] == [f"Job multitag-train-t1: {s}" for s in
                                                                  ("pending", "running", final)]
        assert "[rank 0] epoch 1/2" in said and api.created == ["Service", "Job"]
        said.clear()


class FakeKubernetes:
    """BatchV1Api + CoreV1Api as a real API answers a training Job: pending, running (rank 0 logging),
    then succeeded, or one pod failed."""

    def __init__(self, ending: str):
        self.ending, self.calls, self.created = ending, 0, []

    def create_namespaced_service(self, ns, body):
        self.created.append("Service")

    def create_namespaced_job(self, ns, body):
        self.created.append("Job")

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
