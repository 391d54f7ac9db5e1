"""Annotation suggestions against a random pick of the same size from the same pool.

    .venv/bin/python bench/suggest.py --data sample --seeds 0,1,2,3,4            # the headline measure
    .venv/bin/python bench/suggest.py --data hard --seeds 0,1,2,3,4
    .venv/bin/python bench/suggest.py --measure retrain --start 300 --add 300 --seeds 0,1,2 [--epochs 40]
                                      [--repeats 2] [--start-epochs 120]

A model (the champion) is trained on ``--start`` labelled images of the built-in sample data (or,
with --data hard, the hard set with the photo recipe); from the rest of the train split (the pool,
labels hidden), ``--add`` images are chosen by `multitag suggest`'s ranking (uncertainty around the
tuned thresholds, near-duplicates kept apart) and, as the baseline, at random. Repeated per seed
(the seed picks the starting images and the random ones).

--measure errors (the default) judges the picks without retraining, on what the ranking is for:
the share of picked images the champion gets wrong (any label on the wrong side of its tuned
threshold against the annotations), and the share of the picked images' positive labels that belong
to the rarest third of labels (by frequency in the starting set). Prints both for each arm and the
ratios suggested / random.

--measure retrain trains a model on each enlarged set and scores it on the test split (with
--repeats, that many models per arm, train.seed + 0, 1, ...; with --start-epochs the starting model
trains that many epochs without early stopping). On 2 CPU cores training moves test mAP by more
between seeds than any ranking does: the figures in RESULTS.md are kept as history.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from multitag.config import parse_params
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


def errors_and_rare(y: np.ndarray, probs: np.ndarray, thresholds: np.ndarray, rare: np.ndarray) -> tuple[float, float]:
    """Share of images with any label on the wrong side of its threshold; share of positives that
    are rare labels."""
    wrong = ((probs >= thresholds) != y.astype(bool)).any(axis=1).mean()
    return float(wrong), float(y[:, rare].sum() / max(y.sum(), 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=["sample", "hard"], default="sample")
    ap.add_argument("--measure", choices=["errors", "retrain"], default="errors")
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--start", type=int, default=300)
    ap.add_argument("--add", type=int, default=300)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--epochs", type=int, help="train.epochs for every model (default: params.yaml's)")
    ap.add_argument("--repeats", type=int, default=1, help="retrain: models trained per arm (seeds train.seed + "
                    "0..repeats-1): their mean test mAP, so that one unlucky training run does not decide")
    ap.add_argument("--start-epochs", type=int, help="epochs of the starting model, no early stopping (default: as --epochs)")
    args = ap.parse_args()
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["sample"]["n_images"] = args.images
    if args.data == "hard":  # photos: the hard set and the default (photo) augmentation
        raw["sample"].update(preset="hard", image_size=128)
        del raw["train"]["augment"]
    if args.epochs:
        raw["train"]["epochs"] = args.epochs
    params = parse_params(raw)
    start_params = params.train  # the starting model's; --start-epochs: run to the end, no early stopping
    if args.start_epochs:
        start_params = start_params.model_copy(update={"epochs": args.start_epochs, "patience": args.start_epochs})
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_sample_data(params.sample, tmp / "data")
        full = Layout(tmp / "full")
        ingest(params.ingest.model_copy(update={"annotations": str(tmp / "data/annotations.csv"),
                                                "images": str(tmp / "data/images")}), full)
        make_labels(full)
        manifest = read_manifest(full)
        train_rows = np.flatnonzero(manifest["split"] == "train")
        x_all = np.concatenate([np.load(s) for s in sorted(full.shards.glob("*.npy"))])
        y_all = np.load(full.targets)
        labels = read_json(full.vocabulary)["labels"]
        for seed in (int(s) for s in args.seeds.split(",")):
            rng = np.random.default_rng(seed)
            start = np.zeros(len(manifest), bool)
            start[rng.choice(train_rows, args.start, replace=False)] = True
            base = subset(full, tmp / f"base{seed}", start)
            train(start_params, base)
            start_map = evaluate(params.evaluate, base)["test"]["map"]
            model, meta = load_model_file(base.model)
            pool = np.flatnonzero((manifest["split"] == "train").to_numpy() & ~start)
            probs = predict_scores(model, x_all[pool], torch.device("cpu"), tta=meta["tta"])
            thresholds = np.asarray(read_json(base.thresholds)["thresholds"])
            names = [str(i) for i in pool]
            chosen = suggest(names, x_all[pool], probs, thresholds, labels, args.add)["image"].astype(int).to_numpy()
            arms = {"suggested": chosen, "random": rng.choice(pool, args.add, replace=False)}
            row = {"seed": seed, "start mAP": start_map}
            if args.measure == "errors":
                rare = np.argsort(y_all[start].sum(0), kind="stable")[:max(1, len(labels) // 3)]
                at = {image: i for i, image in enumerate(pool)}
                for name, picked in arms.items():
                    idx = [at[i] for i in picked]
                    row[f"{name} wrong"], row[f"{name} rare"] = errors_and_rare(y_all[picked], probs[idx],
                                                                                thresholds, rare)
            else:
                for name, picked in arms.items():
                    keep = start.copy()
                    keep[picked] = True
                    ws = subset(full, tmp / f"{name}{seed}", keep)
                    runs = []
                    for r in range(args.repeats):
                        train(params.train.model_copy(update={"seed": params.train.seed + r}), ws)
                        runs.append(evaluate(params.evaluate, ws)["test"]["map"])
                    row[name] = float(np.mean(runs))
            results.append(row)
            print(f"  seed {seed}: {row}", flush=True)
    table = pd.DataFrame(results)
    print(f"{args.data} data, {args.images} images; a champion trained on {args.start} labelled images, {args.add} "
          f"chosen from the pool of the train split; recipe: params.yaml's ({'photo defaults' if args.data == 'hard' else 'digits'}), "
          f"{params.train.epochs} epochs{f' (the starting model {args.start_epochs})' if args.start_epochs else ''}")
    print(table.to_string(index=False, float_format="{:.4f}".format))
    if args.measure == "errors":
        wrong, rare = table["suggested wrong"] / table["random wrong"], table["suggested rare"] / table["random rare"]
        print(f"ratio: the champion wrong on suggested / random = {', '.join(f'{r:.2f}' for r in wrong)} per seed "
              f"(mean {wrong.mean():.2f}, >= 2 on {int((wrong >= 2).sum())} of {len(wrong)}); rarest-third share of "
              f"positives suggested / random = {', '.join(f'{r:.2f}' for r in rare)} (mean {rare.mean():.2f})")
        return
    diff = table["suggested"] - table["random"]
    print(f"ratio: suggested - random = {', '.join(f'{100 * d:+.2f}' for d in diff)} mAP points per seed "
          f"(suggested ahead on {int((diff > 0).sum())} of {len(diff)} seeds; test mAP, mean of {args.repeats} "
          "models per arm)")


if __name__ == "__main__":
    main()
