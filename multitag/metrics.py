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


def _ranked_columns(y: np.ndarray, scores: np.ndarray):
    """Every label at once: (sorted scores, cumulative true and false positives, positives, end), each
    (images, labels), highest score first; ``end`` marks the last image of each run of equal scores."""
    order = np.argsort(-scores, axis=0, kind="mergesort")
    s = np.take_along_axis(scores, order, 0)
    yy = np.take_along_axis(y, order, 0).astype(np.float64)
    tp = np.cumsum(yy, 0)
    fp = np.arange(1, len(s) + 1)[:, None] - tp
    end = np.ones(s.shape, bool)
    end[:-1] = s[:-1] != s[1:]
    return s, yy, tp, fp, tp[-1] if len(s) else np.zeros(y.shape[1]), end


def per_label_ap(y: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Average precision of every label (NaN without positives), vectorised over labels: each positive
    adds precision at the end of its run of tied scores, as average_precision does."""
    if len(y) == 0:
        return np.full(y.shape[1], np.nan)
    _, yy, tp, fp, positives, end = _ranked_columns(y, scores)
    n = len(yy)
    end_index = np.where(end, np.arange(n)[:, None], n)
    next_end = np.minimum.accumulate(end_index[::-1], axis=0)[::-1]  # the end of each image's tie run
    precision = tp / (tp + fp)
    at_end = np.take_along_axis(precision, next_end, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = (yy * at_end).sum(0) / positives
    return np.where(positives > 0, ap, np.nan)


def frequency_buckets(train_counts: np.ndarray) -> dict[str, np.ndarray]:
    """Label indices of the head, medium and tail thirds by training frequency (most frequent first;
    ties keep label order)."""
    order = np.argsort(-np.asarray(train_counts), kind="stable")
    return dict(zip(("head", "medium", "tail"), np.array_split(order, 3)))


def bucket_metrics(y: np.ndarray, ap: np.ndarray, pred: np.ndarray, buckets: dict[str, np.ndarray]) -> dict:
    """mAP, micro-F1 and micro recall of each bucket of labels, from the labels' AP (per_label_ap)
    and predictions (NaN where a bucket has no positives)."""
    out = {}
    for name, idx in buckets.items():
        cls = classification_metrics(y[:, idx], pred[:, idx]) if len(idx) else {}
        finite = ap[idx][np.isfinite(ap[idx])]
        out[name] = {"labels": int(len(idx)), "map": float(finite.mean()) if len(finite) else float("nan"),
                     "micro_f1": cls.get("micro_f1", float("nan")), "recall": cls.get("micro_recall", float("nan"))}
    return out


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
    if metric not in ("f1", "precision_at_recall"):
        raise ValueError(f"evaluate.threshold_metric: unknown {metric!r}")
    out = np.full(y.shape[1], default, dtype=np.float64)
    if len(y) == 0:
        return out
    s, _, tp, fp, positives, end = _ranked_columns(y, scores)  # every label at once
    with np.errstate(invalid="ignore", divide="ignore"):
        if metric == "f1":
            score = 2 * tp / (tp + fp + positives)
        else:
            score = np.where(tp / positives >= min_recall, tp / (tp + fp), -1.0)
    score = np.where(end, score, -np.inf)  # cuts only between distinct scores
    k = np.argmax(score, axis=0)
    cols = np.arange(y.shape[1])
    nxt = np.minimum(k + 1, len(s) - 1)
    cut = np.where(k + 1 < len(s), (s[k, cols] + s[nxt, cols]) / 2, s[k, cols])
    return np.where(positives > 0, cut, out)


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
