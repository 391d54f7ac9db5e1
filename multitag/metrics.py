"""Multi-label metrics in NumPy (checked against scikit-learn in tests/test_metrics.py).

Conventions: ``y`` is an (images, labels) 0/1 matrix, ``scores`` the same shape of probabilities.
A per-label quantity that is undefined (no positives for AP; no positives and no predictions for
F1) is NaN and left out of macro averages, like scikit-learn's ``zero_division=np.nan``.
"""

from __future__ import annotations

import numpy as np


def _ranked(y: np.ndarray, s: np.ndarray):
    """Cumulative true/false positives at each distinct score, highest score first."""
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order].astype(np.float64)
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    return np.cumsum(y)[last], np.cumsum(1 - y)[last], s[last]


def pr_curve(y: np.ndarray, s: np.ndarray):
    """(precision, recall, thresholds) of one label, thresholds decreasing."""
    tp, fp, thr = _ranked(y, s)
    return tp / (tp + fp), tp / max(tp[-1], 1), thr


def average_precision(y: np.ndarray, s: np.ndarray) -> float:
    """Area under the step precision-recall curve (scikit-learn's definition); NaN without positives."""
    if y.sum() == 0:
        return float("nan")
    precision, recall, _ = pr_curve(y, s)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def per_label_ap(y: np.ndarray, scores: np.ndarray) -> np.ndarray:
    return np.array([average_precision(y[:, j], scores[:, j]) for j in range(y.shape[1])])


def mean_ap(y: np.ndarray, scores: np.ndarray) -> float:
    """Mean over labels (with at least one positive) of average precision."""
    ap = per_label_ap(y, scores)
    return float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan")


def tune_thresholds(y: np.ndarray, scores: np.ndarray, default: float = 0.5, metric: str = "f1",
                    min_recall: float = 0.9) -> np.ndarray:
    """Per-label thresholds on (y, scores). ``f1``: the cut maximising F1; ``precision_at_recall``:
    the cut with the highest precision among those keeping recall >= ``min_recall`` (the highest
    such threshold on ties). The threshold sits halfway between the chosen cut's score and the next
    lower one, so it generalises rather than sitting on a validation score. Labels with no positives
    keep ``default``."""
    out = np.full(y.shape[1], default, dtype=np.float64)
    for j in range(y.shape[1]):
        positives = y[:, j].sum()
        if positives == 0:
            continue
        tp, fp, thr = _ranked(y[:, j], scores[:, j])
        if metric == "f1":
            score = 2 * tp / (tp + fp + positives)
        elif metric == "precision_at_recall":
            score = np.where(tp / positives >= min_recall, tp / (tp + fp), -1.0)
        else:
            raise ValueError(f"evaluate.threshold_metric: unknown {metric!r}")
        k = int(np.argmax(score))
        out[j] = (thr[k] + thr[k + 1]) / 2 if k + 1 < len(thr) else thr[k]
    return out


def _safe_div(a, b):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)


def classification_metrics(y: np.ndarray, pred: np.ndarray) -> dict:
    """Micro/macro precision, recall and F1, Hamming loss and subset accuracy of 0/1 predictions."""
    y, pred = y.astype(bool), pred.astype(bool)
    tp = (y & pred).sum(axis=0).astype(np.float64)
    fp = (~y & pred).sum(axis=0).astype(np.float64)
    fn = (y & ~pred).sum(axis=0).astype(np.float64)
    label_p, label_r = _safe_div(tp, tp + fp), _safe_div(tp, tp + fn)
    label_f1 = _safe_div(2 * tp, 2 * tp + fp + fn)
    TP, FP, FN = tp.sum(), fp.sum(), fn.sum()

    def nanmean(v):
        return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")

    return {
        "micro_precision": float(_safe_div(TP, TP + FP)),
        "micro_recall": float(_safe_div(TP, TP + FN)),
        "micro_f1": float(_safe_div(2 * TP, 2 * TP + FP + FN)),
        "macro_precision": nanmean(label_p),
        "macro_recall": nanmean(label_r),
        "macro_f1": nanmean(label_f1),
        "hamming_loss": float((y != pred).mean()),
        "subset_accuracy": float((y == pred).all(axis=1).mean()),
        "per_label_f1": label_f1,
    }
