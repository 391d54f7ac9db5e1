"""The champion on new batches before any retraining: is a shifted batch flagged, an ordinary one not?

    .venv/bin/python bench/batch_check.py --images 3000 --batch 200

The built-in sample data trains, evaluates and registers a champion with params.yaml's recipe in a
scratch workspace (each stage's own run function). Then three batches of new sample images (another
seed, never seen) are checked the way the retrain flow checks an inbox batch (multitag.drift):
ordinary; only images whose digits are all among 0-4 (a shift of the labels, not of the images);
and the ordinary batch's images with their colours inverted, or turned by 90 degrees (shifts of the
images: a new camera).
Prints each batch's mAP under the champion against its test mAP, the largest label shifts and
whether the batch was flagged (a drop of more than retrain.alert_drop).
"""

from __future__ import annotations

import argparse
import importlib
import os
import tempfile
from pathlib import Path

import pandas as pd
from PIL import Image, ImageOps

from multitag.config import load_params
from multitag.drift import check_batch
from multitag.layout import RAW_IMAGES, STAGE_MODULES, Layout
from multitag.sample_data import write_sample_data

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=200)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        params = load_params(ROOT / "params.yaml")
        params = params.model_copy(update={
            "ingest": params.ingest.model_copy(update={"annotations": str(tmp / "data/annotations.csv"),
                                                       "images": str(tmp / "data/images")}),
            "store": params.store.model_copy(update={"uri": str(tmp / "store")})})
        write_sample_data(params.sample.model_copy(update={"n_images": args.images}), tmp / "data")
        os.chdir(tmp)
        layout = Layout(tmp)
        for stage in ("ingest", "labels", "train", "evaluate", "register"):
            importlib.import_module(STAGE_MODULES[stage]).run(params, layout)

        new = write_sample_data(params.sample.model_copy(update={"n_images": 4 * args.batch, "seed": 12345}),
                                tmp / "new")
        table = pd.read_csv(new.annotations, keep_default_na=False)
        table["labels"] = table["tags"].str.split()
        raw = tmp / params.retrain.raw / RAW_IMAGES
        raw.mkdir(parents=True)
        for name in table["image_name"]:
            image = Image.open(tmp / "new/images" / name).convert("RGB")
            image.save(raw / name)
            ImageOps.invert(image).save(raw / f"inverted_{name}")
            image.rotate(90).save(raw / f"rotated_{name}")
        ordinary = table.head(args.batch)
        low = table[table["labels"].map(lambda t: bool(t) and all(d in "01234" for d in t))].head(args.batch)
        batches = {"ordinary": [(n, t) for n, t in zip(ordinary["image_name"], ordinary["labels"])],
                   "digits 0-4 only": [(n, t) for n, t in zip(low["image_name"], low["labels"])],
                   **{f"{kind} {what}": [(f"{kind}_{n}", t) for n, t in zip(ordinary["image_name"], ordinary["labels"])]
                      for kind, what in (("inverted", "colours"), ("rotated", "90 degrees"))}}
        rows = []
        for name, items in batches.items():
            c = check_batch(params, layout, {"batch": name, "rows": {n: {"image": n, "labels": t} for n, t in items}})
            rows.append({"batch": name, "images": c["images"], "batch mAP": c["batch_map"], "test mAP": c["test_map"],
                         "drop": c["drop"], "micro-F1": c["batch_micro_f1"], "flagged": c["flagged"],
                         "largest label shifts": ", ".join(f"{s['label']} {s['change']:+.2f}"
                                                           for s in c["largest_shifts"][:3])})
    print(f"champion: sample data, {args.images} images, params.yaml's recipe; retrain.alert_drop "
          f"{params.retrain.alert_drop}; batches of new sample images")
    print(pd.DataFrame(rows).to_string(index=False))
    flagged = {r["batch"]: r["flagged"] for r in rows}
    print(f"ratio: flagged {sum(flagged.values())} of {len(rows)} batches: "
          + ", ".join(f"{k} {'flagged' if v else 'not flagged'}" for k, v in flagged.items()))


if __name__ == "__main__":
    main()
