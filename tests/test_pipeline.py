"""End to end: the Prefect flow over real DVC stages in a temporary git workspace, `dvc repro`
twice, and prediction with the registered champion. Prefect runs on its temporary API server in
this process, and on the session's Prefect server for `multitag run` (test_interruption.py runs it on
a temporary one, as in a user's plain shell)."""

import csv
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from multitag.config import SampleParams
from multitag.registry import Registry
from multitag.sample_data import write_sample_data
from multitag.storage import LocalStore
from tests.conftest import BIN, run, tiny_params

pytestmark = pytest.mark.slow

STAGES = ["sample", "ingest", "labels", "train", "evaluate", "register", "review"]


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_fresh_clones_reproduce_the_committed_run_byte_for_byte(workspace, tmp_path, prefect_server):
    """`dvc repro` twice from a plain shell as the README says (the second runs nothing); an edit
    reruns only the stages whose code it changes; commit; then a clone on another path runs the
    pipeline as `make demo` does: nothing in git changes, data/prepared and dvc.lock are identical."""
    first = _plain_shell(f"source {BIN}/activate && dvc repro", workspace)
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout
    second = _plain_shell(f"source {BIN}/activate && dvc repro", workspace)
    assert "Running stage" not in second.stdout and "Data and pipelines are up to date" in second.stdout
    # dvc.yaml's code deps follow the imports: retrain-only code reruns no stage, device selection
    # (multitag/dataset.py) only the stages with a model
    for module, stale in (("multitag/rawdata.py", []), ("multitag/inbox.py", []),
                          ("multitag/dataset.py", ["train", "evaluate", "register", "review"])):
        path = workspace / module
        original = path.read_bytes()
        path.write_bytes(original + b"\n# an edit\n")
        status = json.loads(run([str(BIN / "dvc"), "status", "--json"], workspace).stdout)
        path.write_bytes(original)
        assert sorted(status) == sorted(stale), (module, status)
    run(["git", "add", "-A"], workspace)
    run(["git", "commit", "-qm", "pipeline run"], workspace)
    assert run(["git", "status", "--porcelain"], workspace).stdout == ""
    for name in ("elsewhere/deeper/clone",):
        clone = tmp_path / name
        clone.parent.mkdir(parents=True, exist_ok=True)
        run(["git", "clone", "-q", str(workspace), str(clone)], tmp_path)
        out = run([str(BIN / "multitag"), "run"], clone, env={"PREFECT_API_URL": prefect_server}).stdout
        assert "stages run               sample, ingest, labels, train, evaluate, register, review" in out
        assert run(["git", "status", "--porcelain"], clone).stdout == ""  # dvc.lock, lineage.yaml unchanged
        assert (clone / "dvc.lock").read_bytes() == (workspace / "dvc.lock").read_bytes()
        assert _files(clone / "data/prepared") == _files(workspace / "data/prepared")
        assert (clone / "models/model.pt").read_bytes() == (workspace / "models/model.pt").read_bytes()


def _plain_shell(script: str, cwd):
    """``script`` in bash with a PATH that does not hold the virtual environment (a new terminal)."""
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if Path(p) != BIN)
    proc = subprocess.run(["bash", "-c", script], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PATH": path})
    assert proc.returncode == 0, f"{script}: {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _user_data_with_bad_records(ws):
    """A user's own folder: sample images plus a missing image, a corrupt image and a row with no tags."""
    data = ws / "mydata"
    write_sample_data(SampleParams(n_images=40, seed=5), data)
    (data / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    Image.fromarray(np.full((64, 64, 3), 90, dtype=np.uint8)).save(data / "images" / "untagged.png")
    with (data / "annotations.csv").open("a", newline="") as f:
        csv.writer(f).writerows([("missing.png", "3 4"), ("corrupt.png", "1"), ("untagged.png", "")])
    return data


def test_flow_runs_every_stage_registers_and_predicts(workspace):
    from flows.pipeline import training_pipeline

    data = _user_data_with_bad_records(workspace)
    params = tiny_params(ingest={"annotations": "mydata/annotations.csv", "images": "mydata/images"})
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    summary = training_pipeline(workdir=str(workspace))
    assert summary["stages_run"] == STAGES
    assert summary["version"] == 1 and summary["new_version"] and summary["champion"]
    assert summary["labels"] == 10 and summary["rejected"] == 2
    assert 0 <= summary["test_map"] <= 1

    issues = {r["image"]: r["reason"] for r in csv.DictReader((workspace / "reports/ingest_issues.csv").open())}
    assert set(issues) == {"missing.png", "corrupt.png"}
    assert "not found" in issues["missing.png"] and "corrupt" in issues["corrupt.png"]
    manifest = pd.read_parquet(workspace / "data/prepared/manifest.parquet")
    assert list(manifest.loc[manifest["source"] == "untagged.png", "tags"].iloc[0]) == []  # kept as a negative

    for out in ["data/labels/targets.npy", "data/labels/vocabulary.json", "models/model.pt",
                "reports/metrics.json", "reports/per_label.csv", "reports/thresholds.json",
                "reports/plots/pr_curves.png", "reports/plots/label_stats.png", "reports/train_history.csv"]:
        assert (workspace / out).stat().st_size > 0, out
    metrics = json.loads((workspace / "reports/metrics.json").read_text())
    assert set(metrics["test"]) >= {"map", "micro_f1", "macro_f1", "hamming_loss", "subset_accuracy"}
    lock = yaml.safe_load((workspace / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    assert not (workspace / "data/.gitignore").exists()  # outputs are ignored by the workspace's .gitignore

    registry = Registry(LocalStore(workspace / "store"), "multitag")
    card = registry.card(1)
    assert card["labels"] == [str(d) for d in range(10)] and len(card["thresholds"]) == 10
    assert card["metrics"]["test"]["map"] == metrics["test"]["map"]
    assert card["params"]["train"]["epochs"] == 1 and card["git"]["commit"] is None  # nothing committed yet
    assert card["data_version"] == json.loads((workspace / "reports/ingest.json").read_text())["data_version"]
    check_model_card(run([str(BIN / "multitag"), "models", "show", "1"], workspace).stdout, workspace)

    again = training_pipeline(workdir=str(workspace))
    assert again["stages_run"] == [] and again["version"] == 1  # DVC skipped every stage

    out = workspace / "pred.csv"
    run([str(BIN / "multitag"), "predict", str(data / "images"), "--model", "champion", "--out", str(out)], workspace)
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 42  # 40 sample images + corrupt.png + untagged.png: every file gets a row
    assert rows[0].keys() >= {"image", "labels", "error", "p_0", "p_9"}
    bad = [r for r in rows if r["error"]]
    assert [r["image"] for r in bad] == ["corrupt.png"]
    good = rows[1]
    assert all(0 <= float(good[f"p_{d}"]) <= 1 for d in range(10))
    assert set(good["labels"].split()) <= {str(d) for d in range(10)}


def test_stage_errors_are_clear_and_not_retried(workspace, prefect_server):
    params = tiny_params(ingest={"annotations": "nowhere.csv", "images": "imgs"})
    (workspace / "imgs").mkdir()
    params["train"]["lrr"] = 1
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    proc = run([str(BIN / "multitag"), "stage", "ingest"], workspace, check=False)
    assert proc.returncode == 1
    assert "train.lrr: unknown key" in proc.stderr and "Traceback" not in proc.stderr

    del params["train"]["lrr"]
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    proc = run([str(BIN / "multitag"), "run"], workspace, check=False, env={"PREFECT_API_URL": prefect_server})
    assert proc.returncode == 1
    # DVC checks the stage's dependencies first; its error names the missing file
    assert "stage 'ingest' failed" in proc.stderr and "nowhere.csv" in proc.stderr.splitlines()[-1]
    assert proc.stderr.count("nowhere.csv") == 1, proc.stderr  # said once, not by DVC, Prefect's states and the CLI


def _table(markdown: str, section: str) -> list[list[str]]:
    """The rows of the first table under ``## section`` (header and rule left out)."""
    part = markdown.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in part.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def check_model_card(card: str, ws) -> None:
    """Every number in MODEL_CARD.md (as `multitag models show` prints it) is the stage outputs' number."""
    metrics = json.loads((ws / "reports/metrics.json").read_text())
    per_label = {r["label"]: r for r in csv.DictReader((ws / "reports/per_label.csv").open())}
    thresholds = json.loads((ws / "reports/thresholds.json").read_text())
    tested = _table(card, "Test metrics")
    assert {k for k, _ in tested[:len(metrics["test"])]} == set(metrics["test"])
    for name, value in tested[:len(metrics["test"])]:
        assert float(value) == pytest.approx(metrics["test"][name], abs=5e-5), name
    vocabulary = _table(card, "Training data")
    assert [r[0] for r in vocabulary] == thresholds["labels"]
    for (label, train_images, threshold), t in zip(vocabulary, thresholds["thresholds"]):
        assert train_images == per_label[label]["train_images"] and float(threshold) == pytest.approx(t, abs=5e-5)
    for label, ap, f1, support, train_images in _table(card, "Weakest labels"):
        assert (ap, f1, support, train_images) == tuple(per_label[label][k] for k in ("ap", "f1", "support", "train_images"))
    weakest = [r[1] for r in _table(card, "Weakest labels")]
    assert weakest == sorted(weakest, key=float)
    ingest = json.loads((ws / "reports/ingest.json").read_text())
    assert f"- data version: {ingest['data_version']}" in card
    assert f"- images: train {ingest['splits']['train']}, val {ingest['splits']['val']}, test {ingest['splits']['test']}" in card
    assert f"Scored on {metrics['test']['images']} test images" in card
