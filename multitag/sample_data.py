"""Built-in sample data: real handwritten digits (shipped inside scikit-learn) composed into
multi-label RGB images.

Each image holds 0..max_digits digits at random positions, sizes and colours, never overlapping,
and is labelled with the set of digits present. Nothing is downloaded: the 1,797 8x8 scans are
the ones scikit-learn installs with itself (its ``load_digits``).
"""

from __future__ import annotations

import importlib.util
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from multitag.config import Params, SampleParams
from multitag.layout import Layout
from multitag.report import write_csv

log = logging.getLogger(__name__)

GAP = 2  # pixels kept free between two digits so they never touch


@dataclass(frozen=True)
class SampleResult:
    images: int
    empty: int
    annotations: str


def _place_boxes(rng: np.random.Generator, n: int, size: int) -> list[tuple[int, int, int]]:
    """Non-overlapping square boxes (x, y, side) for n digits; shrinks digits if they do not fit."""
    lo, hi = size * 5 // 16, size * 7 // 16  # 20..28 px at 64 px: readable after resizing to 32 px
    for _ in range(50):
        boxes: list[tuple[int, int, int]] = []
        for _ in range(n):
            for _ in range(100):
                s = int(rng.integers(lo, hi + 1))
                x, y = (int(v) for v in rng.integers(0, size - s + 1, size=2))
                if all(x + s + GAP <= bx or bx + bs + GAP <= x or y + s + GAP <= by or by + bs + GAP <= y
                       for bx, by, bs in boxes):
                    boxes.append((x, y, s))
                    break
            else:
                break
        if len(boxes) == n:
            return boxes
        hi = max(lo, hi - 2)
    raise RuntimeError(f"cannot place {n} digits without overlap in a {size}px image")


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Background and ink colours with a clear luminance difference (either one may be darker)."""
    lum = np.array([0.299, 0.587, 0.114])
    while True:
        bg, fg = rng.uniform(0, 255, size=(2, 3))
        if abs((fg - bg) @ lum) > 90:
            return bg, fg


def compose(rng: np.random.Generator, digits: np.ndarray, targets: np.ndarray, p: SampleParams):
    """One composed image (H, W, 3 uint8) and the sorted list of digits it shows."""
    n = 0 if rng.random() < p.empty_fraction else int(rng.integers(1, p.max_digits + 1))
    bg, fg = _colours(rng)
    alpha = np.zeros((p.image_size, p.image_size), dtype=np.float32)
    present: set[int] = set()
    for x, y, s in _place_boxes(rng, n, p.image_size):
        k = int(rng.integers(len(digits)))
        glyph = Image.fromarray((digits[k] * (255 / 16)).astype(np.uint8)).resize((s, s), Image.BILINEAR)
        alpha[y:y + s, x:x + s] = np.asarray(glyph, dtype=np.float32) / 255
        present.add(int(targets[k]))
    img = bg * (1 - alpha[..., None]) + fg * alpha[..., None]
    img += rng.normal(0, 6, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), sorted(present)


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's handwritten digits as its ``load_digits`` gives them (images 1797 x 8 x 8, values
    0-16, and their classes), read from the file it reads without importing scikit-learn, which takes
    3 s on 2 cores: most of the sample stage's time."""
    sklearn = Path(importlib.util.find_spec("sklearn").submodule_search_locations[0])
    data = np.loadtxt(sklearn / "datasets/data/digits.csv.gz", delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def write_sample_data(p: SampleParams, out: str | Path | None = None, val_fraction: float = 0.15,
                      test_fraction: float = 0.2) -> SampleResult:
    """Write ``p.n_images`` images and ``annotations.csv`` (image_name,tags) under ``out``: the digits
    preset here, the hard one by multitag/hard_data.py (which drops tags only from the images the
    split fractions put in train)."""
    out = Path(out or p.out)
    if p.preset == "hard":
        from multitag.hard_data import write_hard_data
        made = write_hard_data(out, p.n_images, p.image_size, p.seed, p.missing_tags, val_fraction, test_fraction)
        return SampleResult(images=made["images"], empty=made["empty"], annotations=str(out / "annotations.csv"))
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    images, classes = digits()
    rng = np.random.default_rng(p.seed)
    rows, empty, saving = [], 0, deque()
    with ThreadPoolExecutor(1) as saver:  # Pillow encodes a PNG into a file without the GIL: beside the composing
        for i in range(p.n_images):
            img, present = compose(rng, images, classes, p)
            name = f"img_{i:06d}.png"
            saving.append(saver.submit(Image.fromarray(img).save, images_dir / name, optimize=False, compress_level=1))
            if len(saving) > 64:
                saving.popleft().result()  # at most 64 images held in memory; a failed save raises here
            rows.append((name, " ".join(str(d) for d in present)))
            empty += not present
        for pending in saving:
            pending.result()
    ann = write_csv(out / "annotations.csv", ["image_name", "tags"], rows)  # last: a half-written sample never looks complete
    log.info("wrote %d sample images (%d with no digit) to %s", p.n_images, empty, out)
    return SampleResult(images=p.n_images, empty=empty, annotations=str(ann))


def run(params: Params, layout: Layout) -> SampleResult:
    """The sample stage as dvc.yaml runs it."""
    return write_sample_data(params.sample, layout.root / params.sample.out, params.ingest.val_fraction,
                             params.ingest.test_fraction)
