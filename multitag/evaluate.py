"""Evaluate stage: thresholds tuned per label on validation, metrics on the test split.

Writes ``reports/metrics.json`` (DVC metrics), ``reports/per_label.csv``, ``reports/thresholds.json``,
precision-recall curves as CSV per label (DVC plots) and as one PNG.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import numpy as np

from multitag.config import EvaluateParams, Params
from multitag.layout import Layout, load_split, select_device
from multitag.metrics import classification_metrics, per_label_ap, pr_curve, tune_thresholds
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


def _write_curves(y, scores, labels, ap, out_dir: Path, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    fig, ax = plt.subplots(figsize=(7, 6))
    for j, label in enumerate(labels):
        if y[:, j].sum() == 0:
            continue
        precision, recall, _ = pr_curve(y[:, j], scores[:, j])
        keep = np.unique(np.linspace(0, len(recall) - 1, min(len(recall), MAX_CURVE_POINTS)).astype(int))
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)[:40]
        write_csv(out_dir / f"{j:03d}_{safe}.csv", ["recall", "precision"],
                  zip(np.round(recall[keep], 5), np.round(precision[keep], 5)))
        ax.step(recall, precision, where="post", label=f"{label} (AP {ap[j]:.3f})", linewidth=1)
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title="test precision-recall")
    if len(labels) <= 20:
        ax.legend(fontsize=7, loc="lower left")
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

    write_json(layout.metrics, metrics)
    write_json(layout.thresholds, {
        "labels": labels, "thresholds": [round(float(t), 6) for t in thresholds], "tuned_on": "val",
        "metric": p.threshold_metric, **({"min_recall": p.min_recall} if p.threshold_metric == "precision_at_recall" else {})})
    write_csv(layout.per_label, ["label", "support", "ap", "f1", "threshold"],
              ([label, int(y_test[:, j].sum()), _fmt(test_ap[j]), _fmt(test_f1[j]), round(float(thresholds[j]), 4)]
               for j, label in enumerate(labels)))
    _write_curves(y_test, s_test, labels, test_ap, layout.pr_curves, layout.pr_plot)
    t = metrics["test"]
    log.info("test: mAP %.4f  micro-F1 %.4f  macro-F1 %.4f  Hamming %.4f  subset acc %.4f (%d images)",
             t["map"], t["micro_f1"], t["macro_f1"], t["hamming_loss"], t["subset_accuracy"], t["images"])
    return metrics


def _fmt(v: float) -> str:
    return "" if np.isnan(v) else f"{v:.4f}"


def run(params: Params, layout: Layout) -> dict:
    """The evaluate stage as dvc.yaml runs it."""
    return evaluate(params.evaluate, layout)
