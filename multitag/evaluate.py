"""Evaluate stage: thresholds tuned per label on validation, metrics on the test split.

Writes ``reports/metrics.json`` (DVC metrics: overall, and for the head, medium and tail thirds of the
labels by training frequency), ``reports/per_label.csv`` (every label), ``reports/thresholds.json``,
and precision-recall curves of the labels that matter (the worst by AP, the most frequent, the
rarest), as CSV per label (DVC plots) and as small multiples in one PNG: readable at any number of
labels.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import numpy as np

from multitag.config import EvaluateParams, Params
from multitag.dataset import load_split, select_device
from multitag.layout import Layout
from multitag.metrics import (bucket_metrics, classification_metrics, frequency_buckets, per_label_ap, pr_curve,
                              tune_thresholds)
from multitag.models import load_model_file, predict_scores
from multitag.report import write_csv, write_json

log = logging.getLogger(__name__)

MAX_CURVE_POINTS = 200


def _nan_to_none(v):
    return None if isinstance(v, float) and np.isnan(v) else v


def score_split(y: np.ndarray, scores: np.ndarray, thresholds: np.ndarray) -> tuple[dict, np.ndarray, dict]:
    """(summary metrics, per-label AP, per-label F1) of one split at the given thresholds."""
    ap = per_label_ap(y, scores)
    cls = classification_metrics(y, scores >= thresholds)
    per_label_f1 = cls.pop("per_label_f1")
    summary = {"images": int(len(y)), "map": float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan"),
               **cls}
    return {k: _nan_to_none(v) for k, v in summary.items()}, ap, per_label_f1


def labels_that_matter(ap: np.ndarray, train_counts: np.ndarray, support: np.ndarray, each: int = 4) -> dict[int, str]:
    """Up to 3 x ``each`` labels -> why, in this order: the worst by test AP, the most frequent in
    training, the rarest in training (among labels with test positives; no label twice)."""
    train_counts = np.asarray(train_counts, dtype=np.int64)
    scored = [j for j in range(len(ap)) if support[j] > 0 and np.isfinite(ap[j])]
    picks: dict[int, str] = {}
    for why, ranked in (("worst AP", sorted(scored, key=lambda j: ap[j])),
                        ("most frequent", sorted(scored, key=lambda j: -train_counts[j])),
                        ("rarest", sorted(scored, key=lambda j: train_counts[j]))):
        picks.update((j, why) for j in [j for j in ranked if j not in picks][:each])
    return picks


def _write_curves(y, scores, labels, ap, picks: dict[int, str], train_counts, out_dir: Path, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    cols = 4
    rows = max(1, -(-len(picks) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for ax, j in zip(axes.flat, picks):
        precision, recall, _ = pr_curve(y[:, j], scores[:, j])
        keep = np.unique(np.linspace(0, len(recall) - 1, min(len(recall), MAX_CURVE_POINTS)).astype(int))
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", labels[j])[:40]
        write_csv(out_dir / f"{j:04d}_{safe}.csv", ["recall", "precision"],
                  zip(np.round(recall[keep], 5), np.round(precision[keep], 5)))
        ax.set_visible(True)
        ax.step(recall, precision, where="post", linewidth=1.2)
        ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), xlabel="recall", ylabel="precision")
        ax.set_title(f"{picks[j]}: {labels[j][:28]}\nAP {ap[j]:.3f} · {int(y[:, j].sum())} test · "
                     f"{int(train_counts[j])} train", fontsize=9)
    if not picks:
        axes.flat[0].set_visible(True)
        axes.flat[0].axis("off")
        axes.flat[0].text(0.5, 0.5, "no label has a positive test image", ha="center", va="center")
    fig.suptitle(f"test precision-recall: the worst by AP, the most frequent, the rarest ({len(picks)} of "
                 f"{len(labels)} labels; all in per_label.csv)", fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=80)
    plt.close(fig)


def evaluate(p: EvaluateParams, layout: Layout) -> dict:
    """Tune thresholds on val, score test; returns the metrics written to metrics.json."""
    device = select_device("auto")
    model, meta = load_model_file(layout.model, device)
    labels = meta["labels"]
    splits = {}
    for split in ("val", "test"):
        x, y, _ = load_split(layout, split)
        splits[split] = (y.numpy().astype(np.uint8), predict_scores(model, x, device, tta=meta["tta"]))
    for split, (y, _) in splits.items():
        if len(y) == 0:
            raise ValueError(f"the {split} split is empty: add images or raise ingest.{split}_fraction")
    thresholds = tune_thresholds(*splits["val"], metric=p.threshold_metric, min_recall=p.min_recall)
    metrics = {}
    metrics["val"], _, _ = score_split(*splits["val"], thresholds)
    y_test, s_test = splits["test"]
    metrics["test"], test_ap, test_f1 = score_split(y_test, s_test, thresholds)
    train_counts = load_split(layout, "train", in_memory=False)[1].numpy().sum(0)  # the targets, not the images
    buckets = frequency_buckets(train_counts)
    metrics["buckets"] = {name: {k: _nan_to_none(v) for k, v in m.items()}
                          for name, m in bucket_metrics(y_test, test_ap, s_test >= thresholds, buckets).items()}
    bucket_of = {int(j): name for name, idx in buckets.items() for j in idx}

    write_json(layout.metrics, metrics)
    write_json(layout.thresholds, {
        "labels": labels, "thresholds": [round(float(t), 6) for t in thresholds], "tuned_on": "val",
        "metric": p.threshold_metric, **({"min_recall": p.min_recall} if p.threshold_metric == "precision_at_recall" else {})})
    write_csv(layout.per_label, ["label", "support", "train_images", "bucket", "ap", "f1", "threshold"],
              ([label, int(y_test[:, j].sum()), int(train_counts[j]), bucket_of[j], _fmt(test_ap[j]), _fmt(test_f1[j]),
                round(float(thresholds[j]), 4)] for j, label in enumerate(labels)), for_people=True)
    picks = labels_that_matter(test_ap, train_counts, y_test.sum(0))
    _write_curves(y_test, s_test, labels, test_ap, picks, train_counts, layout.pr_curves, layout.pr_plot)
    t = metrics["test"]
    b = metrics["buckets"]
    log.info("test: mAP %s  micro-F1 %s  macro-F1 %s  Hamming %s  subset acc %s (%d images); mAP head/medium/tail "
             "%s / %s / %s", *(_fmt(t[k]) for k in ("map", "micro_f1", "macro_f1", "hamming_loss", "subset_accuracy")),
             t["images"], *(_fmt(b[k]["map"]) for k in ("head", "medium", "tail")))
    return metrics


def _fmt(v: float | None) -> str:
    return "" if v is None or np.isnan(v) else f"{v:.4f}"


def run(params: Params, layout: Layout) -> dict:
    """The evaluate stage as dvc.yaml runs it."""
    return evaluate(params.evaluate, layout)
