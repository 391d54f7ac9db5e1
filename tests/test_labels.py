import json

import numpy as np
import pandas as pd

from multitag.labels import build_vocabulary, label_stats, make_labels, multi_hot


def test_vocabulary_sorted_then_append_only():
    v1 = build_vocabulary([["dog", "cat"], [], ["car"]])
    assert v1 == ["car", "cat", "dog"]
    v2 = build_vocabulary([["ant"], ["dog"], ["zebra"]], previous=v1)
    assert v2 == ["car", "cat", "dog", "ant", "zebra"]  # old indices keep their meaning


def test_multi_hot_and_stats():
    tags = [["a", "b"], [], ["b"], ["a", "b", "c"]]
    vocab = ["a", "b", "c"]
    y = multi_hot(tags, vocab)
    np.testing.assert_array_equal(y, [[1, 1, 0], [0, 0, 0], [0, 1, 0], [1, 1, 1]])
    s = label_stats(y, vocab, ["train", "train", "val", "test"])
    assert s["frequency"] == {"a": 2, "b": 3, "c": 1}
    assert s["frequency_by_split"]["train"] == {"a": 1, "b": 1, "c": 0}
    assert s["labels_per_image"] == {"0": 1, "1": 1, "2": 1, "3": 1}
    assert s["cooccurrence"][0][1] == 2 and s["cooccurrence"][1][1] == 3 and s["cooccurrence"][0][2] == 1


def test_make_labels_appends_to_existing_vocabulary(tmp_path):
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    pd.DataFrame({"tags": [["b"], [], ["a", "c"]], "split": ["train", "val", "test"]}).to_parquet(
        prepared / "manifest.parquet")
    out = tmp_path / "labels"
    out.mkdir()
    (out / "vocabulary.json").write_text(json.dumps({"labels": ["c", "z"]}))
    result = make_labels(prepared, out, tmp_path / "reports")
    assert json.loads((out / "vocabulary.json").read_text())["labels"] == ["c", "z", "a", "b"]
    assert result.new_labels == ["a", "b"]
    np.testing.assert_array_equal(np.load(out / "targets.npy"), [[0, 0, 0, 1], [0, 0, 0, 0], [1, 0, 1, 0]])
    assert (tmp_path / "reports" / "plots" / "label_stats.png").stat().st_size > 0
