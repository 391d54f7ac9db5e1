"""The hard sample data set (``multitag sample-data --preset hard``; ``sample.preset: hard``): made to
tell training recipes apart, as users' photos do, and built offline from what installed packages ship.

- 18 labels: the ten handwritten digits of scikit-learn's scans and eight drawn shapes, with a long
  tail: label k appears in about ``p_top / (k + 1) ** tail`` of the images (the most frequent in
  ~60%, the rarest in under 2%), and a few pairs depend on each other (a star usually comes with a
  cross; a ring with a circle; 1 with 7), as labels of real data do.
- Objects at varied scale (24-64 px on a 128 px image; 12-52 px before 2026-11-26, when a small digit
  was 3 px at the 32 px the default trains at, too small for any recipe to read), rotation (+-40
  degrees) and position, free to overlap and to run off the edge, some partly hidden by a patch of
  background laid over them.
- Backgrounds: random crops of scikit-learn's two sample photographs, rescaled, flipped and
  recoloured; every image JPEG-compressed (quality 60-90).
- Missing tags: in the images the content-hash split puts in train, each positive tag is dropped
  from the annotations with probability ``missing_tags`` (``annotations.csv``); validation and test
  keep every tag. ``annotations_clean.csv`` has all tags, for measuring label-error tools.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from multitag.layout import split_for
from multitag.report import write_csv

log = logging.getLogger(__name__)

DIGITS = [f"digit_{d}" for d in range(10)]
SHAPES = ["circle", "square", "triangle", "star", "cross", "ring", "diamond", "arrow"]
# Frequency order: the rank of each label in the long tail (most frequent first).
LABELS = ["circle", "digit_1", "square", "digit_7", "triangle", "ring", "digit_3", "star", "digit_0", "cross",
          "digit_8", "diamond", "digit_4", "digit_2", "arrow", "digit_5", "digit_9", "digit_6"]
DEPENDS = {"cross": ("star", 0.7), "ring": ("circle", 0.6), "digit_7": ("digit_1", 0.5)}  # b given a: P(b | a)


def frequencies(p_top: float = 0.6, tail: float = 1.25) -> dict[str, float]:
    return {label: p_top / (k + 1) ** tail for k, label in enumerate(LABELS)}


def _shape_mask(name: str, s: int) -> Image.Image:
    """A white-on-black mask of a shape in an s x s box."""
    m = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(m)
    w = max(2, s // 7)
    c = s / 2
    if name == "circle":
        d.ellipse([1, 1, s - 2, s - 2], fill=255)
    elif name == "ring":
        d.ellipse([1, 1, s - 2, s - 2], outline=255, width=w)
    elif name == "square":
        d.rectangle([s * 0.12, s * 0.12, s * 0.88, s * 0.88], fill=255)
    elif name == "triangle":
        d.polygon([(c, 1), (s - 2, s - 2), (1, s - 2)], fill=255)
    elif name == "diamond":
        d.polygon([(c, 1), (s - 2, c), (c, s - 2), (1, c)], fill=255)
    elif name == "cross":
        d.rectangle([c - w, 1, c + w, s - 2], fill=255)
        d.rectangle([1, c - w, s - 2, c + w], fill=255)
    elif name == "star":
        pts = [(c + (c - 1) * (1 if i % 2 == 0 else 0.42) * math.cos(math.pi * i / 5 - math.pi / 2),
                c + (c - 1) * (1 if i % 2 == 0 else 0.42) * math.sin(math.pi * i / 5 - math.pi / 2)) for i in range(10)]
        d.polygon(pts, fill=255)
    elif name == "arrow":
        d.rectangle([s * 0.1, c - w, s * 0.6, c + w], fill=255)
        d.polygon([(s * 0.55, s * 0.2), (s - 2, c), (s * 0.55, s * 0.8)], fill=255)
    return m


def _digit_mask(glyphs: np.ndarray, k: int, s: int) -> Image.Image:
    img = Image.fromarray((glyphs[k] * (255 / 16)).astype(np.uint8)).resize((s, s), Image.BICUBIC)
    return img.point(lambda v: 255 if v > 90 else int(v * 2.5)).filter(ImageFilter.GaussianBlur(0.6))


def _background(rng: np.random.Generator, photos: list[np.ndarray], size: int) -> Image.Image:
    photo = photos[int(rng.integers(len(photos)))]
    h, w = photo.shape[:2]
    crop = int(rng.integers(size // 2, min(h, w)))
    y, x = int(rng.integers(0, h - crop)), int(rng.integers(0, w - crop))
    img = Image.fromarray(photo[y:y + crop, x:x + crop]).resize((size, size), Image.BILINEAR)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    arr = np.asarray(img, dtype=np.float32)
    arr = arr[..., rng.permutation(3)] * rng.uniform(0.6, 1.3) + rng.uniform(-30, 30)  # recoloured
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def draw_labels(rng: np.random.Generator, freq: dict[str, float]) -> list[str]:
    present = {label for label, p in freq.items() if rng.random() < p}
    for b, (a, p) in DEPENDS.items():
        if a in present and rng.random() < p:
            present.add(b)
    return sorted(present)


def compose(rng: np.random.Generator, labels: list[str], glyphs, targets, photos, size: int) -> Image.Image:
    img = _background(rng, photos, size)
    for label in rng.permutation(labels):
        s = int(rng.integers(size * 6 // 32, size * 16 // 32))
        if label.startswith("digit_"):
            choices = np.flatnonzero(targets == int(label[-1]))
            mask = _digit_mask(glyphs, int(rng.choice(choices)), s)
        else:
            mask = _shape_mask(label, s)
        mask = mask.rotate(float(rng.uniform(-40, 40)), resample=Image.BILINEAR, expand=True)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        x = int(rng.integers(-mask.width // 4, size - mask.width * 3 // 4))
        y = int(rng.integers(-mask.height // 4, size - mask.height * 3 // 4))
        img.paste(Image.new("RGB", mask.size, colour), (x, y), mask.point(lambda v: int(v * rng.uniform(0.75, 1.0))))
        if rng.random() < 0.25:  # partly hidden behind a patch of another background
            ps = int(s * rng.uniform(0.25, 0.5))
            patch = _background(rng, photos, size).resize((ps, ps))
            img.paste(patch, (x + int(rng.integers(0, max(1, mask.width - ps))),
                              y + int(rng.integers(0, max(1, mask.height - ps)))))
    return img


def write_hard_data(out: Path, n_images: int, image_size: int = 128, seed: int = 0, missing_tags: float = 0.15,
                    val_fraction: float = 0.15, test_fraction: float = 0.2) -> dict:
    """Write ``n_images`` JPEGs and both annotation files; the split fractions say which images are
    train (only those lose tags). Returns counts for the log."""
    from sklearn.datasets import load_digits, load_sample_images

    digits = load_digits()
    photos = list(load_sample_images().images)
    rng = np.random.default_rng(seed)
    freq = frequencies()
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows, clean, dropped = [], [], 0
    for i in range(n_images):
        labels = draw_labels(rng, freq)
        img = compose(rng, labels, digits.images, digits.target, photos, image_size)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=int(rng.integers(60, 91)))
        data = buf.getvalue()
        name = f"hard_{i:06d}.jpg"
        (out / "images" / name).write_bytes(data)
        given = labels
        if split_for(hashlib.sha256(data).hexdigest(), val_fraction, test_fraction) == "train":
            given = [t for t in labels if rng.random() >= missing_tags]
            dropped += len(labels) - len(given)
        rows.append((name, " ".join(given)))
        clean.append((name, " ".join(labels)))
    write_csv(out / "annotations_clean.csv", ["image_name", "tags"], clean)
    write_csv(out / "annotations.csv", ["image_name", "tags"], rows)  # last: a half-written set never looks complete
    log.info("wrote %d hard sample images to %s (%d training tags dropped)", n_images, out, dropped)
    return {"images": n_images, "dropped_tags": dropped, "empty": sum(1 for _, t in clean if not t)}
