"""Recipes compared on the hard data set at the same wall-clock training budget.

    .venv/bin/python bench/quality.py --images 4000 --budget 240
    .venv/bin/python bench/quality.py --data sample --params params.yaml   # the built-in digits, the demo's settings
    .venv/bin/python bench/quality.py --repeats 3            # every row with 3 seeds: mean and each run

Each row trains for the same number of seconds (multitag rows through train.time_budget_s, which
fits the epochs and the one-cycle schedule to it; the seed rows stop when the time is spent) on the
same train split and is scored on the same test split with the same metric code:

- seed@N: what the tutorials this project grew from write by hand: the Keras-style CNN
  (`simple_cnn`), BCE, Adam 1e-3, batch 32, a fixed 0.5 threshold, every image decoded and resized
  with PIL in the training loop, at N px (the rows try several sizes: the best is the one to beat);
- the shipped default (multitag/config.py's defaults; with --params, that file's train section at its
  ingest.image_size), then the rows given by --rows: named variants of it (augmentation presets,
  image size, loss, EMA, head).

Prints a table (test mAP, micro-F1, macro-F1, mAP of the head/medium/tail thirds of the labels by
training frequency, the AP of the five rarest labels) and, last, the ratios against the best seed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn

from multitag.config import SampleParams, load_params, parse_params
from multitag.evaluate import evaluate, score_split
from multitag.formats import images_root
from multitag.ingest import ingest
from multitag.labels import make_labels
from multitag.layout import Layout
from multitag.metrics import frequency_buckets
from multitag.models import build_model, load_model_file, predict_scores
from multitag.report import read_json
from multitag.sample_data import write_sample_data
from multitag.train import train

# Named variants of the shipped default: (ingest changes, train changes).
VARIANTS = {
    "aug-none": ({}, {"augment": {"preset": "none"}}),
    "aug-digits": ({}, {"augment": {"preset": "digits"}}),
    "aug-light": ({}, {"augment": {"preset": "light"}}),
    "aug-photos": ({}, {"augment": {"preset": "photos"}}),
    "aug-strong": ({}, {"augment": {"preset": "strong"}}),
    "photos-noflip": ({}, {"augment": {"preset": "photos", "hflip": False}}),
    "photos-noflip-wd0.2": ({}, {"augment": {"preset": "photos", "hflip": False}, "weight_decay": 0.2}),
    "strong-noflip": ({}, {"augment": {"preset": "strong", "hflip": False}}),
    "photos-asl": ({}, {"augment": {"preset": "photos"}, "loss": "asl"}),
    "photos-focal": ({}, {"augment": {"preset": "photos"}, "loss": "focal"}),
    "photos-ema": ({}, {"augment": {"preset": "photos"}, "ema_decay": 0.998}),
    "photos-mldecoder": ({}, {"augment": {"preset": "photos"}, "head": "mldecoder"}),
    "photos-lr6e-3": ({}, {"augment": {"preset": "photos"}, "lr": 0.006}),
    "photos-tta": ({}, {"augment": {"preset": "photos"}, "eval_augment": "hflip"}),
    "photos-tta-ema": ({}, {"augment": {"preset": "photos"}, "eval_augment": "hflip", "ema_decay": 0.998}),
    "photos-posweight": ({}, {"augment": {"preset": "photos"}, "pos_weight": True}),
    "photos-tta-mldecoder": ({}, {"augment": {"preset": "photos"}, "eval_augment": "hflip", "head": "mldecoder"}),
    "48px-photos": ({"image_size": 48}, {"augment": {"preset": "photos"}}),
    "64px": ({"image_size": 64}, {}),
    "64px-photos": ({"image_size": 64}, {"augment": {"preset": "photos"}}),
    "64px-photos-asl": ({"image_size": 64}, {"augment": {"preset": "photos"}, "loss": "asl"}),
    "64px-photos-ema": ({"image_size": 64}, {"augment": {"preset": "photos"}, "ema_decay": 0.998}),
    "64px-photos-mldecoder": ({"image_size": 64}, {"augment": {"preset": "photos"}, "head": "mldecoder"}),
    "96px-photos": ({"image_size": 96}, {"augment": {"preset": "photos"}}),
    "rot30": ({}, {"augment": {"rotation": 30}}),
    "mixup0.4": ({}, {"augment": {"mixup": 0.4}}),
    "rot30-mixup0.4": ({}, {"augment": {"rotation": 30, "mixup": 0.4}}),
    "photos-b64": ({}, {"augment": {"preset": "photos"}, "batch_size": 64, "lr": 0.006}),
}


def seed_recipe(paths, y_train, test_paths, size: int, budget: float, seed: int = 0):
    """The seed tutorials' loop: PIL decode + resize of every image of every batch, every epoch."""
    def batch(ps):
        return torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB").resize((size, size))) for p in ps]))

    torch.manual_seed(seed)
    model = build_model("simple_cnn", y_train.shape[1], size)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.BCEWithLogitsLoss()
    start, epochs = time.perf_counter(), 0
    while time.perf_counter() - start < budget:
        order = np.random.default_rng(seed + epochs).permutation(len(paths))
        for i in range(0, len(order), 32):
            idx = order[i:i + 32]
            x = batch([paths[j] for j in idx]).permute(0, 3, 1, 2).float() / 255
            model.train()
            loss = loss_fn(model(x), torch.from_numpy(y_train[idx]).float())
            opt.zero_grad()
            loss.backward()
            opt.step()
            if time.perf_counter() - start >= budget:
                break
        epochs += 1
    return np.concatenate([predict_scores(model, batch(test_paths[i:i + 256]), torch.device("cpu"))
                           for i in range(0, len(test_paths), 256)])


def row(name: str, y_test, scores, thresholds, y_train, labels, seconds) -> dict:
    summary, ap, _ = score_split(y_test, scores, thresholds)
    rare = np.argsort(y_train.sum(0), kind="stable")[:5]
    out = {"recipe": name, "mAP": summary["map"], "micro-F1": summary["micro_f1"], "macro-F1": summary["macro_f1"],
           **{f"{k} mAP": float(np.nanmean(ap[idx])) for k, idx in frequency_buckets(y_train.sum(0)).items()},
           "train s": round(seconds)}
    out.update({f"AP {labels[j]}": float(ap[j]) for j in rare})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=["hard", "sample"], default="hard")
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--budget", type=float, default=240, help="training seconds for every row")
    ap.add_argument("--seed-sizes", default="32,64,96", help="image sizes the seed recipe tries")
    ap.add_argument("--rows", default="aug-none,aug-photos,aug-strong,64px,64px-photos",
                    help=f"variants of the default to run, from {', '.join(VARIANTS)}")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of every row, seeds train.seed + 0..repeats-1; the table shows their mean")
    ap.add_argument("--params", help="a params.yaml whose settings make the default row (default: the shipped "
                    "defaults, multitag/config.py; the demo's are params.yaml's)")
    args = ap.parse_args()
    params = load_params(args.params) if args.params else parse_params({})
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sample = SampleParams(preset=args.data if args.data == "hard" else "digits", n_images=args.images,
                              image_size=128 if args.data == "hard" else 64)
        write_sample_data(sample, tmp / "data", params.ingest.val_fraction, params.ingest.test_fraction)
        base = params.ingest.model_copy(update={"annotations": str(tmp / "data/annotations.csv"),
                                                "images": str(tmp / "data/images")})

        def prepared(ingest_changes: dict) -> Layout:
            ws = Layout(tmp / f"ws-{ingest_changes.get('image_size', base.image_size)}")
            if not ws.targets.exists():
                ingest(base.model_copy(update=ingest_changes), ws)
                make_labels(ws)
            return ws

        def multitag_row(name: str, ingest_changes: dict, train_changes: dict, seed: int) -> None:
            ws = prepared(ingest_changes)
            p = params.train.model_validate({**params.train.model_dump(), **train_changes, "time_budget_s": args.budget,
                                             "seed": seed})
            for f in (ws.model, ws.checkpoint):
                f.unlink(missing_ok=True)
            start = time.perf_counter()
            train(p, ws)
            seconds = time.perf_counter() - start
            evaluate(params.evaluate, ws)
            manifest, y = pd.read_parquet(ws.manifest), np.load(ws.targets)
            te, tr = (manifest["split"] == "test").to_numpy(), (manifest["split"] == "train").to_numpy()
            net, meta = load_model_file(ws.model)
            x_all = np.concatenate([np.load(s) for s in sorted(ws.shards.glob("*.npy"))])
            scores = predict_scores(net, x_all[te], torch.device("cpu"), tta=meta["tta"])
            thresholds = np.asarray(pd.read_json(ws.thresholds, typ="series")["thresholds"])
            results.append(row(name, y[te], scores, thresholds, y[tr], meta["labels"], seconds))
            print(f"  {name} (seed {seed}): test mAP {results[-1]['mAP']:.4f}", flush=True)

        ws = prepared({})
        manifest, y = pd.read_parquet(ws.manifest), np.load(ws.targets)
        labels = read_json(ws.vocabulary)["labels"]
        root = Path(images_root(base, "tags_csv"))
        paths = np.array([root / s for s in manifest["source"]], dtype=object)
        tr, te = (manifest["split"] == "train").to_numpy(), (manifest["split"] == "test").to_numpy()
        print(f"data: {args.data}, {len(manifest)} images ({tr.sum()} train / {te.sum()} test), {len(labels)} labels; "
              f"training budget {args.budget:.0f} s per row; {torch.get_num_threads()} CPU threads", flush=True)
        seeds = [params.train.seed + r for r in range(args.repeats)]
        for size in (int(s) for s in args.seed_sizes.split(",") if s):  # "" runs no seed row
            for seed in seeds:
                start = time.perf_counter()
                scores = seed_recipe(list(paths[tr]), y[tr], list(paths[te]), size, args.budget, seed)
                results.append(row(f"seed@{size}px", y[te], scores, np.full(len(labels), 0.5), y[tr], labels,
                                   time.perf_counter() - start))
                print(f"  seed@{size}px (seed {seed}): test mAP {results[-1]['mAP']:.4f}", flush=True)
        rows = {f"default ({params.train.model}, {base.image_size}px, {params.train.augment.preset})": ({}, {}),
                **{name: VARIANTS[name] for name in filter(None, args.rows.split(","))}}
        for name, changes in rows.items():
            for seed in seeds:
                multitag_row(name, *changes, seed)

    runs = pd.DataFrame(results)
    table = runs.groupby("recipe", sort=False).mean().reset_index()
    table["train s"] = table["train s"].round().astype(int)
    if args.repeats > 1:  # each run's mAP beside the mean: the spread between seeds
        table.insert(2, "mAP runs", runs.groupby("recipe", sort=False)["mAP"].agg(
            lambda m: " ".join(f"{v:.3f}" for v in m)).to_numpy())
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.float_format", "{:.4f}".format):
        print(table.to_string(index=False))
    seeds = table[table["recipe"].str.startswith("seed@")]
    default = table[table["recipe"].str.startswith("default")].iloc[0]
    best = table.loc[table["mAP"].idxmax()]
    if seeds.empty:
        print(f"ratio: best row ({best['recipe']}) - default = {100 * (best['mAP'] - default['mAP']):+.1f} points")
        return
    best_seed = seeds.loc[seeds["mAP"].idxmax()]
    print(f"ratio: default - best seed ({best_seed['recipe']}) = {100 * (default['mAP'] - best_seed['mAP']):+.1f} mAP points; "
          f"best row ({best['recipe']}) - default = {100 * (best['mAP'] - default['mAP']):+.1f} points; "
          f"best row - best seed = {100 * (best['mAP'] - best_seed['mAP']):+.1f} points, at {args.budget:.0f} s of training each")


if __name__ == "__main__":
    main()
