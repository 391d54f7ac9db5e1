"""Labels stage: the label vocabulary, the multi-hot target matrix and label statistics.

The vocabulary is the sorted set of labels in the data: a function of the data alone, so a workspace
switched to another data set gets that data set's labels, and a label added by a retraining batch
makes the retrain flow train from scratch (output i of a model means label i only within one
vocabulary; champions are compared label by label, by name)."""

from __future__ import annotations

import io
import logging
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from multitag.config import Params
from multitag.layout import Layout, read_manifest
from multitag.report import write_atomic, write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelsResult:
    labels: int
    images: int
    positives: int


def build_vocabulary(tag_lists) -> list[str]:
    """The sorted set of labels."""
    return sorted({t for tags in tag_lists for t in tags})


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
    if not labels:  # every image is a negative
        fig, ax = plt.subplots(figsize=(8, 3))
        ax.axis("off")
        ax.text(0.5, 0.5, f"no positive labels: all {stats['images']} images are negatives", ha="center",
                va="center", fontsize=14)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=80)
        plt.close(fig)
        return
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


def make_labels(layout: Layout) -> LabelsResult:
    """Write vocabulary.json, targets.npy aligned with the manifest rows, and the label statistics
    as JSON and PNG."""
    manifest = read_manifest(layout)
    tag_lists = [list(t) for t in manifest["tags"]]
    vocabulary = build_vocabulary(tag_lists)
    y = multi_hot(tag_lists, vocabulary)
    buffer = io.BytesIO()
    np.save(buffer, y)
    write_atomic(layout.targets, buffer.getvalue())
    write_json(layout.vocabulary, {"labels": vocabulary})

    stats = label_stats(y, vocabulary, manifest["split"])
    write_json(layout.label_stats, stats)
    plot_stats(stats, layout.label_stats_plot)
    result = LabelsResult(labels=len(vocabulary), images=len(y), positives=int(y.sum()))
    log.info("%d labels over %d images (%.2f per image)", len(vocabulary), len(y), stats["mean_labels_per_image"])
    write_json(layout.labels_summary, asdict(result))
    return result


def run(params: Params, layout: Layout) -> LabelsResult:
    """The labels stage as dvc.yaml runs it."""
    return make_labels(layout)
