"""Register stage: put the evaluated model into the registry with its card, then apply the champion
rule: the champion moves only to a model that beats it on the same test images."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict

from multitag.config import Params
from multitag.layout import Layout, load_split, read_manifest, select_device
from multitag.metrics import mean_ap
from multitag.models import load_registered, predict_scores, weights_digest
from multitag.registry import Comparison, Registry, git_commit
from multitag.report import read_csv_rows, read_json, write_json
from multitag.storage import open_store

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
    """compare(card, champion record) -> Comparison for Registry.register: the champion is re-scored
    on this model's test images when it was tested on others, and a model with more labels than the
    champion is compared on the labels the champion knows. A champion knowing labels this model
    lacks is a model of another data set: no comparison."""
    ap = {row["label"]: float(row["ap"]) if row["ap"] else float("nan") for row in read_csv_rows(layout.per_label)}

    def rescore(version: int, labels: list[str]) -> float:
        x, y, _ = load_split(layout, "test")
        device = select_device("auto")
        model, meta = load_registered(registry, version, device)
        scores = predict_scores(model, x, device, tta=meta["tta"])
        return mean_ap(y.numpy()[:, [vocabulary.index(label) for label in labels]],
                       scores[:, [meta["labels"].index(label) for label in labels]])

    def compare(card: dict, champion: dict) -> Comparison:
        v = champion["version"]
        known = champion.get("labels") or registry.card(v)["labels"]
        lacking = sorted(set(known) - set(vocabulary))
        if lacking:
            return Comparison(v, False, note=(
                f"not compared: champion v{v} knows labels this model lacks ({', '.join(lacking[:10])}), a model of "
                "another data set; set register.name to a new name for it"))
        if sorted(known) == sorted(vocabulary) and champion.get("test_set") == card["test_set"]:
            return Comparison(v, True, card["metrics"]["test"]["map"], champion["test_map"])
        shared = [label for label in vocabulary if label in known]
        note = ", champion re-scored on this test set" if champion.get("test_set") != card["test_set"] else ""
        if len(shared) < len(vocabulary):
            note += f", both on the {len(shared)} labels the champion knows ({len(vocabulary) - len(shared)} new left out)"
        candidate = [ap[label] for label in shared if ap[label] == ap[label]]
        return Comparison(v, True, sum(candidate) / len(candidate) if candidate else float("nan"),
                          rescore(v, shared), note)
    return compare


def register_model(params: Params, layout: Layout) -> dict:
    """Register models/model.pt with its metrics, thresholds, params, data and code version.
    Writes and returns reports/registration.json (the same for the same model and registry state:
    the store as configured, no timestamps)."""
    registry = Registry(open_store(params.store.uri, layout.root), params.register.name)
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
    }
    files = {name: getattr(layout, attr) for name, attr in ARTIFACTS.items()}
    compare = comparer(registry, layout, thresholds["labels"])
    reg = registry.register(files, card, params.register.min_improvement, compare, weights_digest(layout.model))
    out = {"name": registry.name, "store": params.store.uri, **asdict(reg), "test_map": metrics["test"]["map"]}
    write_json(layout.registration, out)
    log.info("%s v%d %s; champion: %s (%s)", registry.name, reg.version,
             "registered" if reg.created else "already registered", reg.champion, reg.reason)
    return out


def run(params: Params, layout: Layout) -> dict:
    """The register stage as dvc.yaml runs it."""
    return register_model(params, layout)
