"""A second benchmark data set, as a user's folder would be: JPEG photos with a COCO annotations file.

    .venv/bin/python bench/shapes.py OUT_DIR [--images 2000] [--size 256]

Backgrounds are random crops of the two real photographs scikit-learn ships (sklearn.datasets.
load_sample_images: a temple and a flower), rescaled and colour-shifted; on each, 0-3 filled
shapes (circle, square, triangle, cross, ring) of random size, colour and position. Labels are the
shape kinds present; images without a shape are negatives. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ["circle", "square", "triangle", "cross", "ring"]


def _draw(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, colour: tuple) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if kind == "circle":
        draw.ellipse(box, fill=colour)
    elif kind == "square":
        draw.rectangle(box, fill=colour)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif kind == "cross":
        w = r / 3
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
    else:
        draw.ellipse(box, outline=colour, width=max(2, int(r / 3)))


def make_shapes(out: Path, n: int = 2000, size: int = 256, seed: int = 0) -> Path:
    """Write ``out/images/*.jpg`` and ``out/annotations.json`` (COCO); returns the annotations path."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True)
    coco = {"images": [], "annotations": [],
            "categories": [{"id": i + 1, "name": s} for i, s in enumerate(SHAPES)]}
    for i in range(n):
        photo = photos[i % len(photos)]
        side = int(rng.integers(160, min(photo.shape[:2])))
        y0, x0 = rng.integers(0, photo.shape[0] - side), rng.integers(0, photo.shape[1] - side)
        crop = photo[y0:y0 + side, x0:x0 + side].astype(np.float32) * rng.uniform(0.6, 1.2, 3)
        img = Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
        draw = ImageDraw.Draw(img)
        kinds = rng.choice(len(SHAPES), int(rng.choice(4, p=[0.1, 0.4, 0.3, 0.2])), replace=False)
        for k in kinds:
            r = rng.uniform(0.08, 0.18) * size
            cx, cy = rng.uniform(r, size - r, 2)
            _draw(draw, SHAPES[k], cx, cy, r, tuple(int(c) for c in rng.integers(0, 256, 3)))
        name = f"shapes_{i:05d}.jpg"
        img.save(out / "images" / name, quality=90)
        coco["images"].append({"id": i + 1, "file_name": name, "width": size, "height": size})
        coco["annotations"] += [{"id": len(coco["annotations"]) + 1, "image_id": i + 1, "category_id": int(k) + 1}
                                for k in kinds]
    ann = out / "annotations.json"
    ann.write_text(json.dumps(coco))
    return ann


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()
    print(make_shapes(args.out, args.images, args.size))


if __name__ == "__main__":
    main()
