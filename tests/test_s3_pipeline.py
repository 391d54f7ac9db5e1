"""The whole pipeline with the artifact store and the DVC remote on S3 (moto_server over HTTP):
the registry lives there, predict reads the champion back from it, a fresh clone restores the
exact data and model with `dvc pull`, and no credential leaks into anything written."""

import hashlib
from pathlib import Path

import boto3
import pytest
import yaml

from tests.conftest import BIN, SECRET, run, tiny_params

pytestmark = pytest.mark.slow

DVC_TRACKED = ["data/sample", "data/prepared", "data/labels", "models/model.pt", "reports"]


def _digest(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(path).as_posix().encode() if path.is_dir() else b"")
        h.update(f.read_bytes())
    return h.hexdigest()


def test_pipeline_on_s3_registry_predict_and_dvc_pull(workspace, s3_bucket, tmp_path):
    params = tiny_params(store={"uri": f"s3://{s3_bucket}/models"})
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    multitag = str(BIN / "multitag")
    run([multitag, "remote", "setup", f"s3://{s3_bucket}/dvc"], workspace)
    prefect_home = tmp_path / "prefect-home"
    env = {"PREFECT_HOME": str(prefect_home), "PREFECT_LOGGING_LEVEL": "INFO"}

    proc = run([multitag, "run"], workspace, env=env)
    output = proc.stdout + proc.stderr
    assert "registered version       v1" in proc.stdout
    assert f"s3://{s3_bucket}/models" in proc.stdout and "pushed to DVC remote     storage" in proc.stdout

    s3 = boto3.client("s3")
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket)
            for o in page.get("Contents", [])]
    assert "models/registry/multitag/versions/000001/version.json" in keys
    assert "models/registry/multitag/aliases/champion.json" in keys
    for report in ("metrics.json", "per_label.csv", "pr_curves.png", "ingest_issues.csv", "train_history.csv"):
        assert f"models/registry/multitag/versions/000001/{report}" in keys
    assert any(k.startswith("dvc/files/md5/") for k in keys)

    # prediction reads the champion back from S3
    pred = tmp_path / "pred.csv"
    run([multitag, "predict", str(workspace / "data/sample/images"), "--model", "champion", "--out", str(pred)],
        workspace)
    assert len(pred.read_text().splitlines()) == 1 + 48

    listing = run([multitag, "models", "list"], workspace).stdout
    assert "*" in listing and "      1" in listing
    assert "# multitag v1" in run([multitag, "models", "show", "champion"], workspace).stdout

    # another machine: git clone + dvc pull restores identical data and model
    run(["git", "add", "-A"], workspace)
    run(["git", "commit", "-qm", "pipeline run"], workspace)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(workspace), str(clone)], tmp_path)
    assert not (clone / "models/model.pt").exists()
    run([str(BIN / "dvc"), "pull"], clone)
    for path in DVC_TRACKED:
        assert _digest(clone / path) == _digest(workspace / path), path
    assert "up to date" in run([str(BIN / "dvc"), "status"], clone).stdout

    # the secret credential appears in nothing the run wrote
    written = [output.encode(), (workspace / ".dvc/config").read_bytes()]
    written += [p.read_bytes() for p in (workspace / "reports").rglob("*") if p.is_file()]
    written += [s3.get_object(Bucket=s3_bucket, Key=k)["Body"].read() for k in keys if not k.startswith("dvc/")]
    prefect_files = [p.read_bytes() for p in prefect_home.rglob("*") if p.is_file()]
    assert any(b"Running stage 'train'" in f for f in prefect_files)  # the scan does cover Prefect's logs
    assert any(b"test-metrics" in f for f in prefect_files)  # ... and its artifacts
    written += prefect_files
    assert len(written) > 20
    assert not [w for w in written if SECRET.encode() in w]
