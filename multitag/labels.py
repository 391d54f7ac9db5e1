"""Labels stage: the label vocabulary, the multi-hot target matrix and label statistics."""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from multitag.ingest import MANIFEST

log = logging.getLogger(__name__)

VOCABULARY = "vocabulary.json"
TARGETS = "targets.npy"


@dataclass(frozen=True)
class LabelsResult:
    labels: int
    new_labels: list
    images: int
    positives: int


def build_vocabulary(tag_lists, previous: list[str] | None = None) -> list[str]:
    """Previous vocabulary first, in its order, then labels never seen before, sorted: a later
    vocabulary only appends, so output i of an older model keeps meaning label i."""
    previous = list(previous or [])
    known = set(previous)
    new = sorted({t for tags in tag_lists for t in tags} - known)
    return previous + new


def multi_hot(tag_lists, vocabulary: list[str]) -> np.ndarray:
    """(images, labels) uint8 matrix; a KeyError names a label missing from the vocabulary."""
    index = {label: i for i, label in enumerate(vocabulary)}
    y = np.zeros((len(tag_lists), len(vocabulary)), dtype=np.uint8)
    for row, tags in enumerate(tag_lists):
        for t in tags:
            y[row, index[t]] = 1
    return y


def label_stats(y: np.ndarray, vocabulary: list[str], splits) -> dict:
    """Frequency per label (overall and per split), labels-per-image histogram, co-occurrence counts."""
    splits = np.asarray(splits)
    per_image = Counter(y.sum(axis=1).tolist())
    co = (y.T.astype(np.int64) @ y.astype(np.int64))
    return {
        "images": int(len(y)),
        "labels": list(vocabulary),
        "frequency": {label: int(c) for label, c in zip(vocabulary, y.sum(axis=0))},
        "frequency_by_split": {s: {label: int(c) for label, c in zip(vocabulary, y[splits == s].sum(axis=0))}
                               for s in ("train", "val", "test")},
        "labels_per_image": {str(k): int(v) for k, v in sorted(per_image.items())},
        "mean_labels_per_image": float(y.sum(axis=1).mean()) if len(y) else 0.0,
        "cooccurrence": co.tolist(),
    }


def plot_stats(stats: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = stats["labels"]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4.8))
    a.bar(range(len(labels)), [stats["frequency"][x] for x in labels])
    a.set_xticks(range(len(labels)), labels, rotation=90 if len(labels) > 12 else 0)
    a.set_title("images per label")
    hist = stats["labels_per_image"]
    b.bar([int(k) for k in hist], list(hist.values()))
    b.set_title("labels per image")
    b.set_xlabel("labels")
    im = c.imshow(np.asarray(stats["cooccurrence"]), cmap="viridis")
    c.set_xticks(range(len(labels)), labels, rotation=90 if len(labels) > 12 else 0)
    c.set_yticks(range(len(labels)), labels)
    c.set_title("label co-occurrence (images)")
    fig.colorbar(im, ax=c)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def make_labels(prepared_dir: str | Path = "data/prepared", out_dir: str | Path = "data/labels",
                reports_dir: str | Path = "reports") -> LabelsResult:
    """Write vocabulary.json (appending to an existing one), targets.npy aligned with the manifest
    rows, and the label statistics as JSON and PNG."""
    out_dir, reports_dir = Path(out_dir), Path(reports_dir)
    manifest = pd.read_parquet(Path(prepared_dir) / MANIFEST)
    tag_lists = [list(t) for t in manifest["tags"]]
    vocab_path = out_dir / VOCABULARY
    previous = json.loads(vocab_path.read_text())["labels"] if vocab_path.exists() else []
    vocabulary = build_vocabulary(tag_lists, previous)
    y = multi_hot(tag_lists, vocabulary)

    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / TARGETS, y)
    tmp = vocab_path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"labels": vocabulary}, indent=2) + "\n")
    tmp.replace(vocab_path)

    stats = label_stats(y, vocabulary, manifest["split"])
    reports_dir.mkdir(parents=True, exist_ok=True)
    (reports_dir / "label_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    plot_stats(stats, reports_dir / "plots" / "label_stats.png")
    new = vocabulary[len(previous):] if previous else []
    result = LabelsResult(labels=len(vocabulary), new_labels=new, images=len(y), positives=int(y.sum()))
    log.info("%d labels over %d images (%.2f per image)%s", len(vocabulary), len(y),
             stats["mean_labels_per_image"], f"; new labels: {new}" if new else "")
    (reports_dir / "labels.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result
