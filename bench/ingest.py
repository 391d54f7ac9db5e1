"""Ingest speed: multitag's ingest against a plain serial decode loop, on the same folder of JPEG
and PNG photos, then a second ingest of the unchanged folder.

    .venv/bin/python bench/ingest.py --images 2000 --size 320

The baseline is what a hand-written script does: for each row, PIL open, convert to RGB, resize,
in one process, with no validation, hashing or deduplication. Then multitag ingests the same
folder again (every file read and hashed, every decode from the workspace's decode cache; an
unchanged ingest under `dvc repro` does not run at all: DVC skips it).
Prints a table, the ratios last.
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from multitag.config import IngestParams
from multitag.ingest import ingest
from multitag.layout import Layout


def make_photos(folder: Path, n: int, size: int, seed: int = 0) -> Path:
    """n photo-like images (smooth colour fields with shapes), half JPEG, half PNG, plus annotations."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    rows = []
    for i in range(n):
        low = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((size, size * 3 // 4), Image.BICUBIC)
        arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 12, (size * 3 // 4, size, 3))
        name = f"photo_{i:05d}." + ("jpg" if i % 2 == 0 else "png")
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(folder / name, quality=90)
        rows.append((name, " ".join(sorted(rng.choice(list("abcdefgh"), rng.integers(0, 4), replace=False)))))
    ann = folder.parent / "annotations.csv"
    with ann.open("w", newline="") as f:
        csv.writer(f).writerows([("image_name", "tags"), *rows])
    return ann


def baseline(ann: Path, images: Path, size: int) -> float:
    start = time.perf_counter()
    with ann.open() as f:
        for row in csv.DictReader(f):
            with Image.open(images / row["image_name"]) as img:
                np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR))
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000, help="number of photos")
    ap.add_argument("--size", type=int, default=320, help="photo width in pixels (height 3/4 of it)")
    ap.add_argument("--image-size", type=int, default=64, help="ingest.image_size")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ann = make_photos(tmp / "images", args.images, args.size)
        p = IngestParams(annotations=str(ann), images=str(tmp / "images"), image_size=args.image_size,
                         max_rejected_fraction=0)
        base = baseline(ann, tmp / "images", args.image_size)
        ws = Layout(tmp / "ws")
        start = time.perf_counter()
        first = ingest(p, ws)
        t1 = time.perf_counter() - start
        start = time.perf_counter()
        ingest(p, ws)
        t2 = time.perf_counter() - start
    n = args.images
    print(f"{n} photos {args.size}x{args.size * 3 // 4} (half JPEG, half PNG) -> {args.image_size}px, "
          f"{os.cpu_count()} CPU cores")
    print(f"{'run':38} {'seconds':>8} {'images/s':>9}")
    print(f"{'baseline: serial PIL decode + resize':38} {base:8.2f} {n / base:9.0f}")
    print(f"{'multitag ingest (first)':38} {t1:8.2f} {n / t1:9.0f}   accepted {first.accepted}")
    print(f"{'multitag ingest again (decode cache)':38} {t2:8.2f} {n / t2:9.0f}   (files read and hashed, no decoding)")
    print(f"ratio first ingest / baseline speed: {base / t1:.2f}x")
    print(f"ratio re-ingest time / first: {t2 / t1:.3f}")


if __name__ == "__main__":
    main()
