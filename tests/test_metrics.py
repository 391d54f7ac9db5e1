import numpy as np
import pytest
from sklearn import metrics as skm

from multitag.metrics import average_precision, classification_metrics, mean_ap, tune_thresholds


@pytest.mark.parametrize("seed", range(5))
def test_average_precision_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = (rng.random(200) < 0.3).astype(int)
    s = np.round(rng.random(200) * 0.5 + y * 0.3, 2)  # rounding creates ties
    assert average_precision(y, s) == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)


def test_mean_ap_skips_labels_without_positives():
    rng = np.random.default_rng(0)
    y = (rng.random((100, 4)) < 0.3).astype(int)
    y[:, 2] = 0
    s = rng.random((100, 4))
    expected = np.mean([skm.average_precision_score(y[:, j], s[:, j]) for j in (0, 1, 3)])
    assert mean_ap(y, s) == pytest.approx(expected)


@pytest.mark.parametrize("seed", range(5))
def test_classification_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = (rng.random((150, 6)) < 0.25).astype(int)
    pred = (rng.random((150, 6)) < 0.3).astype(int)
    y[:, 5] = 0
    pred[:, 5] = 0  # an undefined label: left out of macro averages, like zero_division=nan
    m = classification_metrics(y, pred)
    kw = dict(zero_division=np.nan)
    assert m["micro_f1"] == pytest.approx(skm.f1_score(y, pred, average="micro"))
    assert m["macro_f1"] == pytest.approx(np.nanmean(skm.f1_score(y, pred, average=None, **kw)))
    assert m["micro_precision"] == pytest.approx(skm.precision_score(y, pred, average="micro"))
    assert m["micro_recall"] == pytest.approx(skm.recall_score(y, pred, average="micro"))
    assert m["macro_precision"] == pytest.approx(np.nanmean(skm.precision_score(y, pred, average=None, **kw)))
    assert m["macro_recall"] == pytest.approx(np.nanmean(skm.recall_score(y, pred, average=None, **kw)))
    assert m["hamming_loss"] == pytest.approx(skm.hamming_loss(y, pred))
    assert m["subset_accuracy"] == pytest.approx(skm.accuracy_score(y, pred))


def test_tuned_thresholds_reach_the_best_f1():
    rng = np.random.default_rng(3)
    y = (rng.random((300, 3)) < 0.3).astype(int)
    s = np.clip(rng.normal(0.3 + 0.35 * y, 0.2), 0, 1)
    thr = tune_thresholds(y, s)
    for j in range(3):
        best = max(skm.f1_score(y[:, j], s[:, j] >= t) for t in np.unique(s[:, j]))
        assert skm.f1_score(y[:, j], s[:, j] >= thr[j]) == pytest.approx(best)


def test_threshold_default_for_label_without_positives():
    y = np.zeros((10, 1), dtype=int)
    assert tune_thresholds(y, np.linspace(0, 1, 10)[:, None])[0] == 0.5


def test_vectorised_ap_and_thresholds_equal_the_per_label_definitions():
    from multitag.metrics import _ranked, per_label_ap

    rng = np.random.default_rng(7)
    y = (rng.random((400, 30)) < rng.random(30) * 0.3).astype(int)
    y[:, 3] = 0
    s = np.round(rng.random((400, 30)) * 0.6 + y * 0.3, 2)  # ties
    ap = per_label_ap(y, s)
    for j in range(30):
        if j == 3:
            assert np.isnan(ap[j])
        else:
            assert ap[j] == pytest.approx(skm.average_precision_score(y[:, j], s[:, j]), abs=1e-12)
    thr = tune_thresholds(y, s)
    for j in range(30):  # the same cut as a label-by-label search
        if y[:, j].sum() == 0:
            continue
        tp, fp, t = _ranked(y[:, j], s[:, j])
        k = int(np.argmax(2 * tp / (tp + fp + y[:, j].sum())))
        assert thr[j] == pytest.approx((t[k] + t[k + 1]) / 2 if k + 1 < len(t) else t[k])


def test_bucket_metrics_on_a_hand_computed_example():
    from multitag.metrics import bucket_metrics, frequency_buckets, per_label_ap

    buckets = frequency_buckets(np.array([5, 50, 1, 20, 2, 9]))  # labels by training frequency
    assert [list(v) for v in buckets.values()] == [[1, 3], [5, 0], [4, 2]]
    y = np.array([[1, 1, 0, 0, 1, 0], [0, 1, 1, 1, 0, 0], [1, 0, 0, 1, 0, 1]])
    s = np.array([[.9, .8, .1, .2, .7, .3], [.2, .6, .4, .9, .6, .1], [.8, .3, .3, .7, .2, .2]])
    m = bucket_metrics(y, per_label_ap(y, s), s >= 0.5, buckets)
    assert m["head"]["map"] == pytest.approx(1.0)  # labels 1 and 3: every positive above every negative
    # tail: labels 4 and 2 each have one positive, scored above their negatives (.7; .4): AP 1 each
    assert m["tail"]["map"] == pytest.approx(1.0) and m["tail"]["labels"] == 2
    # medium: labels 5 and 0 at 0.5: label 0 predicts rows 0 and 2 (both positive), label 5 predicts none
    assert m["medium"]["recall"] == pytest.approx(2 / 3) and m["medium"]["micro_f1"] == pytest.approx(0.8)
