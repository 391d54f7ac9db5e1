"""infra/prefect.yaml (for `prefect deploy`) describes the deployment `multitag deploy` makes."""

import yaml

from multitag.config import load_params
from tests.conftest import ROOT


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


def test_the_dockerfile_builds_what_the_pools_need():
    text = (ROOT / "infra/Dockerfile").read_text()
    assert [line for line in text.splitlines() if line.startswith("FROM")] == [
        "FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04"]  # a CUDA runtime base
    assert "pip install '.[scale]'" in text and "USER 10001" in text
    assert not any(word in text for word in ("AWS_SECRET", "AWS_ACCESS_KEY", "PREFECT_API_KEY"))
