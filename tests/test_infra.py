"""infra/prefect.yaml (for `prefect deploy`) describes the deployment `multitag deploy` makes."""

import yaml

from multitag.config import load_params
from tests.conftest import ROOT


def test_prefect_yaml_matches_params_and_the_flow():
    from flows.deploy import DEPLOYMENT, ONE_AT_A_TIME
    from flows.retrain import retrain

    [d] = yaml.safe_load((ROOT / "infra/prefect.yaml").read_text())["deployments"]
    p = load_params(ROOT / "params.yaml").retrain
    assert d["schedules"] == [{"cron": p.cron, "timezone": p.timezone}]
    assert d["work_pool"]["name"] == p.work_pool and d["name"] == DEPLOYMENT
    assert d["concurrency_limit"] == {"limit": ONE_AT_A_TIME.limit,
                                      "collision_strategy": ONE_AT_A_TIME.collision_strategy.value}
    path, name = d["entrypoint"].split(":")
    assert (ROOT / path).exists() and name == retrain.fn.__name__
    assert set(d["parameters"]) == set(retrain.parameters.properties)
