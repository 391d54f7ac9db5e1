import hashlib

import numpy as np
from PIL import Image

from multitag.config import SampleParams
from multitag.report import read_csv_rows
from multitag.sample_data import GAP, _place_boxes, digits, write_sample_data


def test_boxes_never_overlap():
    rng = np.random.default_rng(0)
    for _ in range(300):
        boxes = _place_boxes(rng, 4, 64)
        assert len(boxes) == 4
        for i, (x, y, s) in enumerate(boxes):
            assert 0 <= x and x + s <= 64 and 0 <= y and y + s <= 64
            for bx, by, bs in boxes[i + 1:]:
                apart = x + s + GAP <= bx or bx + bs + GAP <= x or y + s + GAP <= by or by + bs + GAP <= y
                assert apart


def test_sample_images_and_annotations(tmp_path):
    result = write_sample_data(SampleParams(n_images=80, empty_fraction=0.2, seed=3), tmp_path)
    rows = read_csv_rows(result.annotations)
    assert len(rows) == 80 and list(rows[0]) == ["image_name", "tags"]
    assert result.empty == sum(r["tags"] == "" for r in rows) > 0  # valid negatives exist
    for r in rows:
        tags = r["tags"].split()
        assert tags == sorted(set(tags)) and len(tags) <= 4 and set(tags) <= set("0123456789")
        img = Image.open(tmp_path / "images" / r["image_name"])
        assert img.size == (64, 64) and img.mode == "RGB"
    # the same seed gives the same data, byte for byte (the PNGs are saved on a thread, 64 at most pending)
    again = write_sample_data(SampleParams(n_images=80, empty_fraction=0.2, seed=3), tmp_path / "again")
    assert (tmp_path / "again" / "annotations.csv").read_text() == (tmp_path / "annotations.csv").read_text()
    assert all((tmp_path / "again" / "images" / r["image_name"]).read_bytes()
               == (tmp_path / "images" / r["image_name"]).read_bytes() for r in rows)
    assert again.empty == result.empty


def test_hard_preset_is_deterministic_long_tailed_and_drops_tags_only_in_train(tmp_path):
    from multitag.hard_data import LABELS, draw_labels, frequencies
    from multitag.layout import split_for

    freq = frequencies()
    assert len(freq) >= 16 and max(freq.values()) > 0.5 and min(freq.values()) < 0.02
    # the drawn labels follow the specified long tail (with the dependent pairs' extra share)
    rng = np.random.default_rng(0)
    draws = [draw_labels(rng, freq) for _ in range(20000)]
    share = {label: sum(label in d for d in draws) / len(draws) for label in LABELS}
    for label in LABELS:
        assert share[label] >= freq[label] * 0.85
    assert share["digit_6"] < 0.02 and share["circle"] > 0.5  # the rarest and the most frequent
    assert share["cross"] > freq["cross"] * 1.5  # a cross usually comes with a star

    p = SampleParams(preset="hard", n_images=80, image_size=96, missing_tags=0.5, seed=5)
    write_sample_data(p, tmp_path / "a")
    write_sample_data(p, tmp_path / "b")
    for name in ("annotations.csv", "annotations_clean.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    given, clean = ({r["image_name"]: r["tags"].split() for r in read_csv_rows(tmp_path / "a" / name)}
                    for name in ("annotations.csv", "annotations_clean.csv"))
    assert given.keys() == clean.keys() and len(given) == 80
    dropped = 0
    for name, tags in clean.items():
        data = (tmp_path / "a" / "images" / name).read_bytes()
        assert data == (tmp_path / "b" / "images" / name).read_bytes()
        img = Image.open(tmp_path / "a" / "images" / name)
        assert img.format == "JPEG" and img.size == (96, 96) and set(tags) <= set(LABELS)
        assert set(given[name]) <= set(tags)
        if split_for(hashlib.sha256(data).hexdigest(), 0.15, 0.2) != "train":
            assert given[name] == tags  # validation and test keep every tag
        dropped += len(tags) - len(given[name])
    assert dropped > 0


def test_the_digits_are_scikit_learns_read_without_importing_it():
    from sklearn.datasets import load_digits

    images, classes = digits()
    reference = load_digits()
    assert np.array_equal(images, reference.images) and np.array_equal(classes, reference.target)
