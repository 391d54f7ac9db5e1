"""Annotation suggestions against a random pick: which 300 images should be labelled next?

    .venv/bin/python bench/suggest.py --start 300 --add 300 --seeds 0,1,2 [--epochs 40] [--repeats 2] [--start-epochs 120]

From the built-in sample data, a model is trained on ``--start`` labelled images; from the rest of
the train split (the pool, labels hidden), ``--add`` more are chosen by `multitag suggest`'s ranking
(uncertainty around the tuned thresholds, near-duplicates kept apart) and, as the baseline, at
random; a model is trained on each enlarged set and scored on the same test split. Repeated per
seed (the seed picks the starting images and the random ones); with --repeats each enlarged set
trains that many models (train.seed + 0, 1, ...) and counts their mean; with --start-epochs the
starting model (the one that ranks) trains that many epochs, without early stopping, so that it is
not at chance level. Prints test mAP per seed and the difference suggested - random last.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from multitag.config import load_params
from multitag.evaluate import evaluate
from multitag.ingest import ingest
from multitag.labels import make_labels
from multitag.layout import Layout, read_manifest
from multitag.models import load_model_file, predict_scores
from multitag.report import read_json
from multitag.sample_data import write_sample_data
from multitag.suggest import suggest
from multitag.train import train

ROOT = Path(__file__).resolve().parents[1]


def subset(full: Layout, dest: Path, keep: np.ndarray) -> Layout:
    """A workspace whose train split holds only the images ``keep`` marks (val and test unchanged)."""
    ws = Layout(dest)
    shutil.rmtree(dest, ignore_errors=True)
    ws.prepared.mkdir(parents=True)
    (ws.prepared / "shards").symlink_to(full.shards.resolve(), target_is_directory=True)
    manifest = read_manifest(full)
    split = manifest["split"].to_numpy().copy()
    split[(split == "train") & ~keep] = "pool"
    manifest.assign(split=split).to_parquet(ws.manifest, index=False)
    shutil.copytree(full.labels, ws.labels)
    return ws


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--start", type=int, default=300)
    ap.add_argument("--add", type=int, default=300)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, help="train.epochs for every model (default: params.yaml's)")
    ap.add_argument("--repeats", type=int, default=1, help="models trained per arm (seeds train.seed + 0..repeats-1): "
                    "their mean test mAP, so that one unlucky training run does not decide")
    ap.add_argument("--start-epochs", type=int, help="epochs of the starting model, no early stopping (default: as --epochs)")
    args = ap.parse_args()
    params = load_params(ROOT / "params.yaml")
    if args.epochs:
        params = params.model_copy(update={"train": params.train.model_copy(update={"epochs": args.epochs})})
    start_params = params.train  # the starting model's; --start-epochs: run to the end, no early stopping
    if args.start_epochs:
        start_params = start_params.model_copy(update={"epochs": args.start_epochs, "patience": args.start_epochs})
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_sample_data(params.sample.model_copy(update={"n_images": args.images}), tmp / "data")
        full = Layout(tmp / "full")
        ingest(params.ingest.model_copy(update={"annotations": str(tmp / "data/annotations.csv"),
                                                "images": str(tmp / "data/images")}), full)
        make_labels(full)
        manifest = read_manifest(full)
        train_rows = np.flatnonzero(manifest["split"] == "train")
        x_all = np.concatenate([np.load(s) for s in sorted(full.shards.glob("*.npy"))])
        labels = read_json(full.vocabulary)["labels"]
        for seed in (int(s) for s in args.seeds.split(",")):
            rng = np.random.default_rng(seed)
            start = np.zeros(len(manifest), bool)
            start[rng.choice(train_rows, args.start, replace=False)] = True
            base = subset(full, tmp / f"base{seed}", start)
            train(start_params, base)
            evaluate(params.evaluate, base)
            model, meta = load_model_file(base.model)
            pool = np.flatnonzero((manifest["split"] == "train").to_numpy() & ~start)
            probs = predict_scores(model, x_all[pool], torch.device("cpu"), tta=meta["tta"])
            thresholds = np.asarray(read_json(base.thresholds)["thresholds"])
            names = [str(i) for i in pool]
            chosen = suggest(names, x_all[pool], probs, thresholds, labels, args.add)["image"].astype(int).to_numpy()
            scores = {}
            for name, picked in (("suggested", chosen), ("random", rng.choice(pool, args.add, replace=False))):
                keep = start.copy()
                keep[picked] = True
                ws = subset(full, tmp / f"{name}{seed}", keep)
                runs = []
                for r in range(args.repeats):
                    train(params.train.model_copy(update={"seed": params.train.seed + r}), ws)
                    runs.append(evaluate(params.evaluate, ws)["test"]["map"])
                scores[name] = float(np.mean(runs))
            results.append({"seed": seed, "start mAP": evaluate(params.evaluate, base)["test"]["map"], **scores})
            print(f"  seed {seed}: {results[-1]}", flush=True)
    table = pd.DataFrame(results)
    print(f"sample data, {args.images} images; {args.start} labelled + {args.add} chosen from the pool; "
          f"params.yaml's recipe, {params.train.epochs} epochs"
          f"{f' (the starting model {args.start_epochs})' if args.start_epochs else ''}; test mAP (mean of {args.repeats} models per arm)")
    print(table.to_string(index=False, float_format="{:.4f}".format))
    diff = table["suggested"] - table["random"]
    print(f"ratio: suggested - random = {', '.join(f'{100 * d:+.2f}' for d in diff)} mAP points per seed "
          f"(suggested ahead on {int((diff > 0).sum())} of {len(diff)} seeds)")


if __name__ == "__main__":
    main()
