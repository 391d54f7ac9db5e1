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


def label_stats(y: np.ndarray, vocabulary: list[str], splits, top: int = 30, pairs: int = 20,
                min_pair: int = 3) -> dict:
    """Frequency per label (overall and per split), labels per image, and co-occurrence: P(b | a) among
    the ``top`` most frequent labels, and the ``pairs`` strongest pairs of all (by the cosine
    n_ab / sqrt(n_a n_b), which favours pairs seen together often over rare coincidences; seen together
    in at least ``min_pair`` images; with their lift). Co-occurrence is counted only where labels meet
    (a sparse product), so the cost grows with the data, not with the square of the vocabulary."""
    from scipy import sparse

    splits = np.asarray(splits)
    freq = y.sum(axis=0).astype(np.int64)
    per_image = Counter(y.sum(axis=1).tolist())
    co = (sparse.csr_matrix(y.astype(np.int64)).T @ sparse.csr_matrix(y.astype(np.int64))).tocoo()
    keep = (co.row < co.col) & (co.data >= min_pair)
    a, b, n_ab = co.row[keep], co.col[keep], co.data[keep]
    lift = n_ab * len(y) / np.maximum(freq[a] * freq[b], 1)
    cosine = n_ab / np.sqrt(np.maximum(freq[a] * freq[b], 1))
    strongest = np.argsort(-cosine, kind="stable")[:pairs]
    top_idx = [int(j) for j in np.argsort(-freq, kind="stable")[:top] if freq[j] > 0]
    dense = (y[:, top_idx].T.astype(np.int64) @ y[:, top_idx].astype(np.int64)) if top_idx else np.zeros((0, 0))
    return {
        "images": int(len(y)),
        "labels": list(vocabulary),
        "frequency": {label: int(c) for label, c in zip(vocabulary, freq)},
        "frequency_by_split": {s: {label: int(c) for label, c in zip(vocabulary, y[splits == s].sum(axis=0))}
                               for s in ("train", "val", "test")},
        "labels_per_image": {str(k): int(v) for k, v in sorted(per_image.items())},
        "mean_labels_per_image": float(y.sum(axis=1).mean()) if len(y) else 0.0,
        "top_labels": [vocabulary[j] for j in top_idx],
        "conditional": np.round(dense / np.maximum(freq[top_idx], 1)[:, None], 4).tolist(),  # row a, column b: P(b | a)
        "pairs": [{"a": vocabulary[a[k]], "b": vocabulary[b[k]], "images": int(n_ab[k]),
                   "p_b_given_a": round(float(n_ab[k] / freq[a[k]]), 4), "p_a_given_b": round(float(n_ab[k] / freq[b[k]]), 4),
                   "cosine": round(float(cosine[k]), 4), "lift": round(float(lift[k]), 3)} for k in strongest],
    }


def plot_stats(stats: dict, path: Path) -> None:
    """Three panels that stay readable from 2 to thousands of labels: images per label (log scale,
    sorted, the most and least frequent named), labels per image, and P(b | a) among the most
    frequent labels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = stats["labels"]
    path.parent.mkdir(parents=True, exist_ok=True)
    if not labels:  # every image is a negative
        fig, ax = plt.subplots(figsize=(8, 3))
        ax.axis("off")
        ax.text(0.5, 0.5, f"no positive labels: all {stats['images']} images are negatives", ha="center",
                va="center", fontsize=14)
        fig.savefig(path, dpi=80)
        plt.close(fig)
        return
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(18, 5.5), gridspec_kw={"width_ratios": [1.3, 0.7, 1.1]})
    ranked = sorted(labels, key=lambda x: -stats["frequency"][x])
    counts = [max(stats["frequency"][x], 0.8) for x in ranked]  # zero counts drawn just under 1 on the log axis
    a.bar(range(len(ranked)), counts, width=1.0 if len(ranked) > 60 else 0.8, color="tab:blue")
    a.set_yscale("log")
    a.set_ylabel("images (log scale)")
    a.set_title(f"images per label, {len(labels)} labels, most frequent first")
    if len(ranked) <= 30:
        a.set_xticks(range(len(ranked)), [x[:20] for x in ranked], rotation=90, fontsize=8)
    else:  # name the five most and the five least frequent, in a box (labels of equal counts would overlap on the bars)
        a.set_xticks([])
        a.set_xlabel("labels, by frequency")
        top5, bottom5 = ([f"  {ranked[i][:24]} ({stats['frequency'][ranked[i]]})" for i in idx]
                         for idx in (range(5), range(len(ranked) - 5, len(ranked))))
        a.text(0.98, 0.97, "\n".join(["most frequent:", *top5, "least frequent:", *bottom5]),
               transform=a.transAxes, ha="right", va="top", multialignment="left", fontsize=7, family="monospace",
               bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "0.7"})
    hist = stats["labels_per_image"]
    b.bar([int(k) for k in hist], list(hist.values()), color="tab:gray")
    b.set(title="labels per image", xlabel="labels", ylabel="images")
    top = stats["top_labels"]
    im = c.imshow(np.asarray(stats["conditional"]) if top else np.zeros((1, 1)), cmap="viridis", vmin=0, vmax=1)
    c.set_xticks(range(len(top)), [x[:16] for x in top], rotation=90, fontsize=7)
    c.set_yticks(range(len(top)), [x[:16] for x in top], fontsize=7)
    c.set(title=f"P(column | row) among the {len(top)} most frequent labels", xlabel="b", ylabel="a")
    fig.colorbar(im, ax=c, fraction=0.046)
    fig.tight_layout()
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
