import json

import numpy as np
import pandas as pd

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
    assert s["cooccurrence"][0][1] == 2 and s["cooccurrence"][1][1] == 3 and s["cooccurrence"][0][2] == 1


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
