"""Register stage: put the evaluated model into the registry with its card, then apply the champion
rule: the champion moves only to a model that beats it on the same test images."""

from __future__ import annotations

import hashlib
import logging
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from multitag.config import Params
from multitag.dataset import load_split, select_device
from multitag.layout import Layout, read_manifest
from multitag.metrics import per_label_ap
from multitag.models import load_model_file, load_registered, predict_scores, weights_digest
from multitag.registry import Comparison, Registry, git_commit, open_registry
from multitag.report import read_csv_rows, read_json, write_json
from multitag.serving import export_onnx

log = logging.getLogger(__name__)


# What a registered version holds: the model and the reports of the run that made it.
ARTIFACTS = {"model.pt": "model", "thresholds.json": "thresholds", "metrics.json": "metrics",
             "per_label.csv": "per_label", "pr_curves.png": "pr_plot", "train_history.csv": "train_history",
             "ingest_issues.csv": "ingest_issues", "label_stats.json": "label_stats",
             "label_stats.png": "label_stats_plot"}  # file in the version -> Layout attribute


def test_set_digest(layout: Layout) -> str:
    """Identity of the test split: the sorted content hashes of its images."""
    m = read_manifest(layout, ["sha256", "split"])
    return hashlib.sha256("\n".join(sorted(m.loc[m["split"] == "test", "sha256"])).encode()).hexdigest()[:16]


def comparer(registry: Registry, layout: Layout, vocabulary: list[str]):
    """compare(card, champion record) -> Comparison for Registry.register. Both models are scored on
    this run's test images (the champion re-scored there), label by label: a model with more labels
    than the champion is compared on the labels the champion knows; a champion knowing labels this
    model lacks is a model of another data set, and there is no comparison. The comparison also
    gives both models' mAP on the head, medium and tail thirds of the labels."""
    x, y, _ = load_split(layout, "test")
    y = y.numpy()
    bucket_of = {row["label"]: row["bucket"] for row in read_csv_rows(layout.per_label)}
    device = select_device("auto")

    def test_ap(model, meta, labels: list[str]) -> np.ndarray:
        scores = predict_scores(model, x, device, tta=meta["tta"])
        return per_label_ap(y[:, [vocabulary.index(label) for label in labels]],
                            scores[:, [meta["labels"].index(label) for label in labels]])

    def compare(card: dict, champion: dict) -> Comparison:
        v = champion["version"]
        known = champion.get("labels") or registry.card(v)["labels"]
        lacking = sorted(set(known) - set(vocabulary))
        if lacking:
            return Comparison(v, False, note=(
                f"not compared: champion v{v} knows labels this model lacks ({', '.join(lacking[:10])}), a model of "
                "another data set; set register.name to a new name for it"))
        shared = [label for label in vocabulary if label in known]
        ours = test_ap(*load_model_file(layout.model, device), shared)
        theirs = test_ap(*load_registered(registry, v, device), shared)
        note = ", champion re-scored on this test set" if champion.get("test_set") != card["test_set"] else ""
        if len(shared) < len(vocabulary):
            note += f", both on the {len(shared)} labels the champion knows ({len(vocabulary) - len(shared)} new left out)"
        buckets = {}
        for name in ("head", "medium", "tail"):
            idx = [i for i, label in enumerate(shared) if bucket_of[label] == name]
            buckets[name] = [_mean(ours[idx]), _mean(theirs[idx])]
        return Comparison(v, True, _mean(ours), _mean(theirs), note, buckets)
    return compare


def _mean(ap: np.ndarray) -> float | None:
    finite = ap[np.isfinite(ap)]
    return round(float(finite.mean()), 6) if len(finite) else None


def register_model(params: Params, layout: Layout) -> dict:
    """Register models/model.pt with its metrics, thresholds, params, data and code version.
    Writes and returns reports/registration.json (the same for the same model and registry state:
    the store as configured, no timestamps)."""
    registry = open_registry(params, layout.root)
    metrics = read_json(layout.metrics)
    thresholds = read_json(layout.thresholds)
    ingest_summary = read_json(layout.ingest_summary)
    run_log = layout.run_log / "train.json"
    card = {
        "labels": thresholds["labels"], "thresholds": thresholds["thresholds"], "metrics": metrics,
        "params": params.dump(), "data_version": ingest_summary["data_version"],
        "images": ingest_summary["splits"], "test_set": test_set_digest(layout),
        "train": {**read_json(layout.train_summary), **(read_json(run_log) if run_log.exists() else {})},
        "git": git_commit(layout.root),
        "per_label": read_csv_rows(layout.per_label),  # support, training images, AP, F1, threshold per label
    }
    files = {name: getattr(layout, attr) for name, attr in ARTIFACTS.items()}
    compare = comparer(registry, layout, thresholds["labels"])
    with tempfile.TemporaryDirectory() as tmp:  # every version also carries its ONNX export, for serving stacks
        files["model.onnx"] = export_onnx(layout.model, Path(tmp) / "model.onnx", thresholds["thresholds"])
        reg = registry.register(files, card, params.register.min_improvement, compare, weights_digest(layout.model))
    out = {"name": registry.name, "store": params.store.uri, **asdict(reg), "test_map": metrics["test"]["map"]}
    write_json(layout.registration, out)
    log.info("%s v%d %s; champion: %s (%s)", registry.name, reg.version,
             "registered" if reg.created else "already registered", reg.champion, reg.reason)
    return out


def run(params: Params, layout: Layout) -> dict:
    """The register stage as dvc.yaml runs it."""
    return register_model(params, layout)
