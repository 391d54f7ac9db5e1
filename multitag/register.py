"""Register stage: put the evaluated model into the registry with its card, then apply the
champion rule."""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch

from multitag.config import Params
from multitag.ingest import MANIFEST
from multitag.metrics import mean_ap
from multitag.models import load_model_file, predict_scores
from multitag.registry import Registry, git_commit
from multitag.storage import open_store
from multitag.train import load_split, select_device

log = logging.getLogger(__name__)

# What a registered version holds: the model and the reports of the run that made it.
ARTIFACTS = {"model.pt": "models/model.pt", "thresholds.json": "reports/thresholds.json",
             "metrics.json": "reports/metrics.json", "per_label.csv": "reports/per_label.csv",
             "pr_curves.png": "reports/plots/pr_curves.png", "train_history.csv": "reports/train_history.csv",
             "ingest_issues.csv": "reports/ingest_issues.csv", "label_stats.json": "reports/label_stats.json",
             "label_stats.png": "reports/plots/label_stats.png"}


def test_set_digest(prepared_dir: str | Path) -> str:
    """Identity of the test split: the sorted content hashes of its images."""
    m = pd.read_parquet(Path(prepared_dir) / MANIFEST, columns=["sha256", "split"])
    return hashlib.sha256("\n".join(sorted(m.loc[m["split"] == "test", "sha256"])).encode()).hexdigest()[:16]


def champion_rescorer(registry: Registry, prepared_dir: Path, labels_dir: Path, vocabulary: list[str]):
    """rescore(version) -> that version's test mAP on the current test split, over the labels it knows."""
    def rescore(version: int) -> float:
        x, y, _ = load_split(prepared_dir, labels_dir, "test")
        device = select_device("auto")
        model, meta = registered_model(registry, version, device)
        scores = predict_scores(model, x, device)
        common = [j for j, label in enumerate(meta["labels"]) if label in vocabulary]
        cols = [vocabulary.index(meta["labels"][j]) for j in common]
        return mean_ap(y.numpy()[:, cols], scores[:, common])
    return rescore


def register_model(params: Params, workspace: str | Path = ".") -> dict:
    """Register models/model.pt with its metrics, thresholds, params, data and code version.
    Writes and returns reports/registration.json."""
    ws = Path(workspace)
    store = open_store(params.store.uri, ws)
    registry = Registry(store, params.register.name)
    metrics = json.loads((ws / "reports/metrics.json").read_text())
    thresholds = json.loads((ws / "reports/thresholds.json").read_text())
    ingest_summary = json.loads((ws / "reports/ingest.json").read_text())
    card = {
        "labels": thresholds["labels"], "thresholds": thresholds["thresholds"], "metrics": metrics,
        "params": params.model_dump(mode="json"), "data_version": ingest_summary["data_version"],
        "images": ingest_summary["splits"], "test_set": test_set_digest(ws / "data/prepared"),
        "train": json.loads((ws / "reports/train.json").read_text()), "git": git_commit(ws),
    }
    files = {name: ws / rel for name, rel in ARTIFACTS.items()}
    rescore = champion_rescorer(registry, ws / "data/prepared", ws / "data/labels", thresholds["labels"])
    reg = registry.register(files, card, params.register.min_improvement, rescore)
    out = {"name": registry.name, "store": store.uri, **asdict(reg),
           "test_map": metrics["test"]["map"], "url": store.url(registry.version_key(reg.version))}
    (ws / "reports/registration.json").write_text(json.dumps(out, indent=2) + "\n")
    log.info("%s v%d %s; champion: %s (%s)", registry.name, reg.version,
             "registered" if reg.created else "already registered", reg.champion, reg.reason)
    return out


def registered_model(registry: Registry, version: int, device: torch.device | str = "cpu"):
    """(model, metadata) of a registered version, its checksum verified (for re-scoring a
    champion and for ``train.init_from``)."""
    with tempfile.TemporaryDirectory() as tmp:
        registry.download_model(version, Path(tmp) / "model.pt")
        return load_model_file(Path(tmp) / "model.pt", device)
