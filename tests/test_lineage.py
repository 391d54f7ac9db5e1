"""A user's path from the demo to their own data, retraining and another machine, as the README tells
it: a first run on their own folder, two retrains from inbox batches laid out like that folder, a
push, then `git clone` + `dvc pull` elsewhere; a used workspace switched to another data set; and
`multitag serve` started alone."""

import csv
import json
import os
import re
import subprocess

import numpy as np
import pytest
import yaml
from PIL import Image

from flows.retrain_steps import score_pair
from multitag.registry import Registry
from multitag.storage import open_store
from tests.conftest import BIN, free_port, init_workspace, run, stop_process_group, tiny_params
from tests.test_retrain_server import flow_runs, retrain_workspace, wait_for

pytestmark = pytest.mark.slow
COLOURS = {"red": (200, 30, 30), "green": (30, 170, 40), "blue": (40, 60, 210)}


def own_data(folder, n: int, seed: int):
    """A user's folder: labels.csv beside images/, n PNGs of coloured squares on grey, labelled by colour."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        img = np.full((40, 40, 3), 128, np.uint8) + rng.integers(-20, 20, (40, 40, 3)).astype(np.uint8)
        tags = sorted(c for c in COLOURS if rng.random() < 0.45)
        for c in tags:
            x, y = rng.integers(0, 28, 2)
            img[y:y + 12, x:x + 12] = COLOURS[c]
        name = f"s{seed}_{i:03d}.png"
        Image.fromarray(img).save(folder / "images" / name)
        rows.append((name, " ".join(tags)))
    with (folder / "labels.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("image_name", "tags"), *rows])
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """The user's data set (60 images, 3 labels, outside the workspace) and two later batches."""
    base = tmp_path_factory.mktemp("user-data")
    return {"data": own_data(base / "photos", 60, 1), "b1": own_data(base / "batch-1", 30, 2),
            "b2": own_data(base / "batch-2", 30, 3)}


def own_params(photos, **sections) -> dict:
    return tiny_params(ingest={"annotations": str(photos["data"] / "labels.csv"),
                               "images": str(photos["data"] / "images")},
                       retrain={"min_new_images": 10}, train={"augment": {"preset": "light"}}, **sections)


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _multitag(*args, cwd, env, check=True):
    return run([str(BIN / "multitag"), *args], cwd, env=env, check=check)


@pytest.fixture(scope="module")
def first_run(photos, prefect_server, tmp_path_factory):
    """A fresh workspace pointed at the user's folder, run once: the reference result."""
    ws = init_workspace(tmp_path_factory.mktemp("user") / "ws")
    env = {"PREFECT_API_URL": prefect_server}
    run(["git", "add", "-A"], ws)
    run(["git", "commit", "-qm", "a clone of the project"], ws)
    (ws / "params.yaml").write_text(yaml.safe_dump(own_params(photos), sort_keys=False))  # the README's edit
    _multitag("run", cwd=ws, env=env)
    run(["git", "add", "dvc.lock", "lineage.yaml", "params.yaml"], ws)  # the README's commit set, as written
    run(["git", "commit", "-qm", "run"], ws)
    assert run(["git", "status", "--porcelain"], ws).stdout == ""  # nothing else to commit, nothing left out
    return {"ws": ws, "env": env, "model": (ws / "models/model.pt").read_bytes()}


def test_own_data_retrained_twice_then_restored_elsewhere_by_dvc_pull(first_run, photos, tmp_path):
    ws, env = first_run["ws"], first_run["env"]
    params_before = (ws / "params.yaml").read_bytes()
    _multitag("remote", "setup", str(tmp_path / "remote"), cwd=ws, env=env)
    run(["git", "add", ".dvc/config"], ws)
    run(["git", "commit", "-qm", "remote"], ws)

    # a batch laid out like the user's own folder: labels.csv beside images/, no options
    added = _multitag("inbox", "add", str(photos["b1"]), "--name", "b1", cwd=ws, env=env)
    assert "30 image(s) added" in added.stdout
    _multitag("retrain", cwd=ws, env=env)
    ledger = json.loads((ws / "data/raw/batches.json").read_text())
    assert [(e["batch"], e["added"]) for e in ledger] == [("origin", 60), ("b1", 30)]  # nothing left out
    assert json.loads((ws / "reports/ingest.json").read_text())["accepted"] == 90
    lineage = yaml.safe_load((ws / "lineage.yaml").read_text())["lineage"]
    assert lineage["raw"] and lineage["batches"] == 2
    assert lineage["origin"] == {"annotations": str(photos["data"] / "labels.csv"),
                                 "images": str(photos["data"] / "images")}
    assert (ws / "params.yaml").read_bytes() == params_before  # the user's configuration is untouched
    reg = json.loads((ws / "reports/registration.json").read_text())
    message = run(["git", "log", "-1", "--format=%s"], ws).stdout.strip()
    assert message.startswith("retrain: +30 images, mAP ")  # same 3 labels: none new
    shown = score_pair(reg["champion_map"], reg["compared_map"])  # v1 re-scored on this test set, as register compared
    assert f"mAP {shown[0]} → {shown[1]} (v2 " in message and "re-scored" in reg["reason"]

    registry = Registry(open_store("store", ws), "multitag")
    champion = registry.alias("champion")[0]["version"]
    _multitag("inbox", "add", str(photos["b2"]), "--name", "b2", cwd=ws, env=env)
    _multitag("retrain", cwd=ws, env=env)
    # labels unchanged: fine-tuned from the champion of that time
    assert json.loads((ws / ".multitag/runs/train.json").read_text())["start"] == f"registered version {champion}"
    assert [v["version"] for v in registry.versions()] == [1, 2, 3]
    assert yaml.safe_load((ws / "lineage.yaml").read_text())["lineage"]["batches"] == 3
    assert run(["git", "status", "--porcelain", "--", "dvc.lock", "lineage.yaml", "data/raw.dvc"], ws).stdout == ""

    clone = tmp_path / "elsewhere" / "clone"
    clone.parent.mkdir()
    run(["git", "clone", "-q", str(ws), str(clone)], tmp_path)
    run([str(BIN / "dvc"), "pull"], clone)
    for path in ("data/raw", "data/prepared", "data/labels", "reports"):
        assert _files(clone / path) == _files(ws / path), path
    assert (clone / "models/model.pt").read_bytes() == (ws / "models/model.pt").read_bytes()
    status = run([str(BIN / "dvc"), "status"], clone).stdout
    assert "Data and pipelines are up to date" in status, status


def test_a_used_workspace_switched_to_another_data_set(first_run, photos, prefect_server, tmp_path):
    env = {"PREFECT_API_URL": prefect_server}
    ws = init_workspace(tmp_path / "ws")  # the demo: sample digits
    _multitag("run", cwd=ws, env=env)
    (ws / "params.yaml").write_text(yaml.safe_dump(own_params(photos), sort_keys=False))
    failed = _multitag("run", cwd=ws, env=env, check=False)
    assert failed.returncode == 1
    assert "another data set" in failed.stderr and "register.name" in failed.stderr
    # said once, as the CLI's last line, not repeated by DVC and by Prefect's task and flow states
    assert failed.stderr.count("another data set") == 1, failed.stderr
    assert "Traceback" not in failed.stderr
    assert [v["version"] for v in Registry(open_store("store", ws), "multitag").versions()] == [1]

    (ws / "params.yaml").write_text(yaml.safe_dump(own_params(photos, register={"name": "photos"}), sort_keys=False))
    out = _multitag("run", cwd=ws, env=env).stdout
    assert "labels                   3" in out and "first registered version" in out
    assert (ws / "models/model.pt").read_bytes() == first_run["model"]  # as in a fresh workspace
    pred = tmp_path / "pred.csv"
    _multitag("predict", str(photos["b1"] / "images"), "--model", "champion", "--out", str(pred), cwd=ws, env=env)
    header = pred.read_text().splitlines()[0].split(",")
    assert header[3:] == ["p_blue", "p_green", "p_red"]


def test_serve_alone_starts_the_server_it_needs(tmp_path):
    ws = retrain_workspace(tmp_path / "ws")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", PREFECT_HOME=str(tmp_path / "prefect-home"))
    proc = subprocess.Popen([str(BIN / "multitag"), "serve", "--interval", "5", "--port", str(port)], cwd=ws, env=env,
                            stdout=(tmp_path / "serve.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        done = wait_for(lambda: proc.poll() is None and [r for r in _runs(api) if r["state_type"] == "COMPLETED"],
                        240, "a scheduled retrain run on the server `multitag serve` started")
        assert re.fullmatch(r"retrain(: not trained| v\d+) \(\+\d+ images\)( champion)?", done[0]["name"]), done[0]["name"]
    finally:
        stop_process_group(proc)
    log = (tmp_path / "serve.log").read_text()
    assert "starting a Prefect server at http://127.0.0.1:" in log and "Cannot schedule" not in log

    worker = _multitag("worker", cwd=ws, env={"PREFECT_API_URL": ""}, check=False)
    assert worker.returncode == 1 and "multitag server" in worker.stderr  # the exact command to run first


def _runs(api):
    try:
        return flow_runs(api)
    except Exception:
        return []
