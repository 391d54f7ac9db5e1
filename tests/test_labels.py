import json

import numpy as np
import pandas as pd
import pytest

from multitag.labels import build_vocabulary, label_stats, make_labels, multi_hot
from multitag.layout import Layout


def test_vocabulary_is_the_sorted_set_of_labels():
    assert build_vocabulary([["dog", "cat"], [], ["car"], ["dog"]]) == ["car", "cat", "dog"]


def test_multi_hot_and_stats():
    tags = [["a", "b"], [], ["b"], ["a", "b", "c"]]
    vocab = ["a", "b", "c"]
    y = multi_hot(tags, vocab)
    np.testing.assert_array_equal(y, [[1, 1, 0], [0, 0, 0], [0, 1, 0], [1, 1, 1]])
    s = label_stats(y, vocab, ["train", "train", "val", "test"])
    assert s["frequency"] == {"a": 2, "b": 3, "c": 1}
    assert s["frequency_by_split"]["train"] == {"a": 1, "b": 1, "c": 0}
    assert s["labels_per_image"] == {"0": 1, "1": 1, "2": 1, "3": 1}
    assert s["top_labels"] == ["b", "a", "c"]  # by frequency
    assert s["conditional"][0] == pytest.approx([1.0, 2 / 3, 1 / 3], abs=1e-4)  # P(b|b), P(a|b), P(c|b)
    assert s["conditional"][1][0] == 1.0  # P(b | a): every image with a has b
    pairs = label_stats(y, vocab, ["train"] * 4, min_pair=1)["pairs"]
    assert [(p["a"], p["b"], p["images"]) for p in pairs][0] == ("a", "b", 2)  # cosine 2 / sqrt(2 x 3)
    assert pairs[0]["p_b_given_a"] == 1.0 and [p["lift"] for p in pairs if (p["a"], p["b"]) == ("a", "c")] == [2.0]


def test_make_labels_follows_the_data_alone(tmp_path):
    ws = Layout(tmp_path)
    ws.prepared.mkdir(parents=True)
    pd.DataFrame({"tags": [["b"], [], ["a", "c"]], "split": ["train", "val", "test"]}).to_parquet(ws.manifest)
    ws.labels.mkdir()
    ws.vocabulary.write_text(json.dumps({"labels": ["c", "z"]}))  # a previous data set's: not kept
    result = make_labels(ws)
    assert json.loads(ws.vocabulary.read_text())["labels"] == ["a", "b", "c"] and result.labels == 3
    np.testing.assert_array_equal(np.load(ws.targets), [[0, 1, 0], [0, 0, 0], [1, 0, 1]])
    assert ws.label_stats_plot.stat().st_size > 0


@pytest.mark.parametrize("n_labels", [2, 1000])
def test_reports_stay_readable_from_two_to_a_thousand_labels(tmp_path, n_labels):
    from multitag.evaluate import _write_curves, labels_that_matter
    from multitag.labels import plot_stats

    rng = np.random.default_rng(0)
    freq = 0.5 / np.arange(1, n_labels + 1) ** 0.8
    y = (rng.random((600, n_labels)) < freq).astype(np.uint8)
    vocab = [f"label_{j:04d}" for j in range(n_labels)]
    stats = label_stats(y, vocab, rng.choice(["train", "val", "test"], 600))
    assert len(stats["top_labels"]) == min(30, n_labels) and len(stats["pairs"]) <= 20
    plot_stats(stats, tmp_path / "label_stats.png")
    assert (tmp_path / "label_stats.png").stat().st_size > 10_000
    scores = np.clip(y * 0.4 + rng.random(y.shape) * 0.6, 0, 1)
    from multitag.metrics import per_label_ap
    ap, counts = per_label_ap(y, scores), y.sum(0)
    picks = labels_that_matter(ap, counts, counts)
    assert len(picks) == min(12, int((counts > 0).sum()))
    assert next(iter(picks)) == int(np.nanargmin(np.where(counts > 0, ap, np.nan)))  # the worst AP comes first
    assert picks[int(np.argmax(counts))] in ("worst AP", "most frequent")
    _write_curves(y, scores, vocab, ap, picks, counts, tmp_path / "pr", tmp_path / "pr.png")
    assert (tmp_path / "pr.png").stat().st_size > 10_000
    named = sorted(f.stem.split("_", 1)[1] for f in (tmp_path / "pr").iterdir())
    assert named == sorted(vocab[j] for j in picks)  # one curve per chosen label, named after it
