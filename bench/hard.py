"""Write the hard benchmark data set to a folder and print its label frequencies.

    .venv/bin/python bench/hard.py OUT_DIR [--images 4000] [--size 128] [--seed 0] [--missing-tags 0.15]

The same generator as `multitag sample-data --preset hard` (multitag/hard_data.py): 18 long-tailed
labels (digits and drawn shapes) on photographic backgrounds, JPEG, tags missing in train only.
OUT_DIR/annotations.csv is what a user would train on, OUT_DIR/annotations_clean.csv every true tag.
Train on it with bench/quality.py --annotations OUT_DIR/annotations.csv --images OUT_DIR/images.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from multitag.hard_data import write_hard_data
from multitag.report import read_csv_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--missing-tags", type=float, default=0.15)
    a = ap.parse_args()
    counts = write_hard_data(a.out, a.images, a.size, a.seed, a.missing_tags)
    given = [r["tags"].split() for r in read_csv_rows(a.out / "annotations.csv")]
    clean = [r["tags"].split() for r in read_csv_rows(a.out / "annotations_clean.csv")]
    print(f"{counts['images']} images in {a.out}, {counts['dropped_tags']} training tags dropped, "
          f"{counts['empty']} images without a label")
    print(f"{'label':10s} {'share (true)':>12s} {'share (given)':>13s}")
    for label in sorted({t for tags in clean for t in tags}, key=lambda t: -sum(t in c for c in clean)):
        share = sum(label in c for c in clean) / len(clean)
        print(f"{label:10s} {share:12.3f} {sum(label in g for g in given) / len(given):13.3f}")


if __name__ == "__main__":
    main()
