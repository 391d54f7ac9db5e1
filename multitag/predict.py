"""Batch prediction over a folder of images with a registered model (or a model file)."""

from __future__ import annotations

import csv
import json
import logging
import tempfile
from pathlib import Path

import numpy as np

from multitag.errors import RecordError
from multitag.images import IMAGE_SUFFIXES, decode, read_bytes
from multitag.layout import select_device
from multitag.models import load_model_file, predict_scores
from multitag.registry import Registry
from multitag.storage import Store

log = logging.getLogger(__name__)

def _thresholds(path: str, labels: list[str]) -> np.ndarray:
    """A thresholds.json for these labels (as the evaluate stage writes it); any other is refused."""
    try:
        data = json.loads(Path(path).read_text())
        thresholds, their_labels = data["thresholds"], data.get("labels", labels)
    except FileNotFoundError:
        raise FileNotFoundError(f"thresholds file not found: {path}") from None
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path}: not a thresholds file (expected {{\"labels\": [...], \"thresholds\": [...]}})") from None
    if len(thresholds) != len(labels) or their_labels != labels:
        raise ValueError(f"{path}: {len(thresholds)} thresholds for labels {their_labels[:5]}...; the model has "
                         f"{len(labels)} labels {labels[:5]}...: use the thresholds.json of this model's run")
    return np.asarray(thresholds, dtype=np.float64)


def _load(model: str, registry: Registry, thresholds_file: str | None, device):
    """(model, metadata, thresholds, description) for a registry reference or a model file path."""
    if Path(model).suffix in (".pt", ".pth") or "/" in model:
        if not Path(model).is_file():
            raise FileNotFoundError(f"model file not found: {model}")
        net, meta = load_model_file(model, device)
        thresholds = (_thresholds(thresholds_file, meta["labels"]) if thresholds_file
                      else np.full(len(meta["labels"]), 0.5))
        return net, meta, thresholds, model
    with tempfile.TemporaryDirectory() as tmp:
        version, card = registry.download_model(model, Path(tmp) / "model.pt")
        net, meta = load_model_file(Path(tmp) / "model.pt", device)
    return net, meta, np.asarray(card["thresholds"]), f"{registry.name} v{version}"


def predict_folder(folder: str | Path, model: str, store: Store, registry_name: str, out: str | Path,
                   thresholds_file: str | None = None, batch_size: int = 256) -> dict:
    """Write a CSV: image, predicted labels (space-separated, at the tuned thresholds), error, and
    one probability column per label. Unreadable images get a row with the error, not a crash."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    device = select_device("auto")
    net, meta, thresholds, desc = _load(model, Registry(store, registry_name), thresholds_file, device)
    labels, size = meta["labels"], meta["image_size"]
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    failed, first_error = 0, None
    with out.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "labels", "error", *[f"p_{label}" for label in labels]])
        for start in range(0, len(files), batch_size):
            ok, arrays = [], []
            for path in files[start:start + batch_size]:
                try:
                    arrays.append(decode(read_bytes(path), size, path.name))
                    ok.append(path)
                except RecordError as err:
                    w.writerow([path.relative_to(folder).as_posix(), "", str(err), *[""] * len(labels)])
                    failed += 1
                    first_error = first_error or f"{path.name}: {err}"
            if not ok:
                continue
            probs = predict_scores(net, np.stack(arrays), device, tta=meta["tta"])
            for path, p in zip(ok, probs):
                predicted = " ".join(label for label, pi, t in zip(labels, p, thresholds) if pi >= t)
                w.writerow([path.relative_to(folder).as_posix(), predicted, "", *[f"{v:.5f}" for v in p]])
    log.info("predicted %d images with %s -> %s (%d unreadable)", len(files) - failed, desc, out, failed)
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    if failed == len(files):
        raise ValueError(f"none of the {failed} image files in {folder} could be read (reasons per file in {out}); "
                         f"first: {first_error}")
    return {"images": len(files), "predicted": len(files) - failed, "failed": failed, "model": desc, "out": str(out)}
