import csv

import numpy as np
from PIL import Image

from multitag.config import SampleParams
from multitag.sample_data import GAP, _place_boxes, write_sample_data


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
    result = write_sample_data(SampleParams(n_images=60, empty_fraction=0.2, seed=3), tmp_path)
    with open(result.annotations, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 60 and list(rows[0]) == ["image_name", "tags"]
    assert result.empty == sum(r["tags"] == "" for r in rows) > 0  # valid negatives exist
    for r in rows:
        tags = r["tags"].split()
        assert tags == sorted(set(tags)) and len(tags) <= 4 and set(tags) <= set("0123456789")
        img = Image.open(tmp_path / "images" / r["image_name"])
        assert img.size == (64, 64) and img.mode == "RGB"
    # the same seed gives the same data
    again = write_sample_data(SampleParams(n_images=60, empty_fraction=0.2, seed=3), tmp_path / "again")
    assert (tmp_path / "again" / "annotations.csv").read_text() == (tmp_path / "annotations.csv").read_text()
    assert again.empty == result.empty
