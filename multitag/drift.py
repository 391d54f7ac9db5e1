"""The champion on every new batch, before anything is retrained: how it scores on the batch's own
labels against its test split, and how the batch's labels differ from its training data.

A batch whose mAP under the champion is more than ``retrain.alert_drop`` below the champion's test
mAP is flagged: new data the deployed model does poorly on (a new camera, a new season, another
annotator). Each check is appended to ``<retrain.raw>/batch_checks.csv``, versioned with the raw
data: the champion's score on new data over time.
"""

from __future__ import annotations

import csv
import json
import logging
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from multitag.config import Params
from multitag.dataset import select_device
from multitag.images import decode
from multitag.layout import BATCH_CHECKS, RAW_IMAGES, Layout
from multitag.metrics import classification_metrics, per_label_ap
from multitag.models import load_registered, predict_scores
from multitag.registry import CHAMPION, Registry, open_registry

log = logging.getLogger(__name__)

COLUMNS = ["checked_at", "batch", "champion", "images", "batch_map", "test_map", "drop", "batch_micro_f1",
           "test_micro_f1", "new_labels", "flagged"]


def check_batch(params: Params, layout: Layout, entry: dict) -> dict:
    """The champion on the images a batch added or relabelled (ledger ``entry``), on the labels it
    knows; plus the batch's label frequencies against the champion's training data."""
    registry = open_registry(params, layout.root)
    champion = registry.alias(CHAMPION)
    out = {"batch": entry["batch"], "images": len(entry["rows"]), "checked": False}
    if champion is None or not entry["rows"]:
        return {**out, "reason": "no champion yet" if champion is None else "no new images"}
    version = champion[0]["version"]
    card = registry.card(version)
    device = select_device("auto")
    model, meta = load_registered(registry, version, device)
    labels = meta["labels"]
    raw = layout.root / params.retrain.raw / RAW_IMAGES
    rows = list(entry["rows"].values())
    x = np.stack([decode((raw / r["image"]).read_bytes(), meta["image_size"], r["image"]) for r in rows])
    y = np.array([[label in r["labels"] for label in labels] for r in rows], dtype=np.uint8)
    probs = predict_scores(model, x, device, tta=meta["tta"])
    ap = per_label_ap(y, probs)
    batch_map = float(np.nanmean(ap)) if np.isfinite(ap).any() else None
    micro = classification_metrics(y, probs >= np.asarray(card["thresholds"]))["micro_f1"]
    test = card["metrics"]["test"]
    drop = test["map"] - batch_map if batch_map is not None and test["map"] is not None else None
    batch_labels = {t for r in rows for t in r["labels"]}
    train_freq = _train_frequency(registry, version, labels, card.get("images", {}).get("train", 0))
    shift = sorted(((label, float(y[:, j].mean()) - train_freq.get(label, 0.0)) for j, label in enumerate(labels)),
                   key=lambda kv: -abs(kv[1]))[:5]
    return {**out, "checked": True, "champion": version, "batch_map": _round(batch_map), "test_map": test["map"],
            "drop": _round(drop), "batch_micro_f1": _round(micro), "test_micro_f1": test.get("micro_f1"),
            "new_labels": sorted(batch_labels - set(labels)),
            "vanished_labels": len([label for label in labels if label not in batch_labels]),
            "largest_shifts": [{"label": label, "change": round(change, 4)} for label, change in shift],
            "flagged": drop is not None and drop > params.retrain.alert_drop}


def _train_frequency(registry: Registry, version: int, labels: list[str], train_images: int) -> dict[str, float]:
    """Share of the champion's training images with each label (from the version's label_stats.json)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            registry.store.get_file(registry.version_key(version, "label_stats.json"), Path(tmp) / "s.json")
        except LookupError:
            return {}
        stats = json.loads((Path(tmp) / "s.json").read_text())
    train = stats["frequency_by_split"]["train"]
    return {label: train.get(label, 0) / max(train_images, 1) for label in labels}


def _round(v):
    return None if v is None or v != v else round(float(v), 4)


def record(layout: Layout, params: Params, checks: list[dict]) -> None:
    """Append the checks to the history kept with the raw data."""
    path = layout.root / params.retrain.raw / BATCH_CHECKS
    new = not path.exists()
    with path.open("a", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if new:
            w.writerow(COLUMNS)
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        for c in checks:
            if c["checked"]:
                w.writerow([now, c["batch"], c["champion"], c["images"], c["batch_map"], c["test_map"], c["drop"],
                            c["batch_micro_f1"], c["test_micro_f1"], " ".join(c["new_labels"]), c["flagged"]])
