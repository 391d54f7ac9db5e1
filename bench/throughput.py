"""Training throughput: how much of the model's own speed multitag's data path keeps.

    .venv/bin/python bench/throughput.py [--images 1024] [--source-size 256] [--image-size 64] [--epochs 2]

Same model (params.yaml's train.model), optimizer, loss and batch size in all three rows, on JPEG
photos of --source-size px (bench/shapes.py) trained at --image-size px:

(a) the model alone: batches sliced from a float tensor already in memory (the ceiling);
(b) multitag's data path: the uint8 shards written by ingest (read into memory once, before the
    clock starts, as train() does per run), each batch converted and augmented on the tensor
    (params.yaml's augment preset), multitag's training loop;
(c) a seed-style data path: every image of every batch opened, decoded and resized with PIL in the
    training process, every epoch.

The three take turns epoch by epoch. Prints images/second per row, then b/a and b/c.
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
from shapes import make_shapes  # bench/shapes.py (this script's folder is on sys.path)

from multitag.config import load_params
from multitag.dataset import load_split
from multitag.ingest import ingest
from multitag.labels import make_labels
from multitag.layout import Layout
from multitag.losses import make_loss
from multitag.models import build_model
from multitag.train import Run, TrainData, make_optimizer, make_scheduler, train_one_epoch

ROOT = Path(__file__).resolve().parents[1]


def _setup(p, n_labels: int, size: int, steps: int, y, x_warm):
    """Model, optimizer, schedule and loss, after one untimed warm-up step (first-call costs)."""
    torch.manual_seed(0)
    model = build_model(p.model, n_labels, size)
    opt = make_optimizer(model, p)
    sched, loss_fn = make_scheduler(opt, p, steps + 1), make_loss(p, y)
    _step(model, opt, sched, loss_fn, x_warm, y[:len(x_warm)])
    return model, opt, sched, loss_fn


def _step(model, opt, sched, loss_fn, x, y) -> None:
    model.train()
    loss = loss_fn(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--source-size", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=4)
    args = ap.parse_args()
    params = load_params(ROOT / "params.yaml")
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ann = make_shapes(tmp / "shapes", args.images, args.source_size)
        p_ingest = params.ingest.model_copy(update={"annotations": str(ann), "images": str(tmp / "shapes" / "images"),
                                                    "format": "coco", "image_size": args.image_size,
                                                    "val_fraction": 0.01, "test_fraction": 0.01})
        ws = Layout(tmp / "ws")
        ingest(p_ingest, ws, cache=False)
        make_labels(ws)
        p = params.train.model_copy(update={"epochs": args.epochs, "device": "cpu"})
        x_u8, y, _ = load_split(ws, "train")
        n, bs = len(x_u8), p.batch_size
        steps = n // bs
        batches = [slice(i * bs, (i + 1) * bs) for i in range(steps)]
        used = steps * bs * args.epochs
        x_float = x_u8.permute(0, 3, 1, 2).float().div(255).contiguous()
        warm = x_float[:bs]
        manifest = pd.read_parquet(ws.manifest)
        sources = manifest.loc[manifest["split"] == "train", "source"].tolist()
        paths = [tmp / "shapes" / "images" / s for s in sources]
        size = args.image_size
        gen = torch.Generator().manual_seed(0)
        setups = {key: _setup(p, y.shape[1], size, steps * args.epochs, y, warm) for key in "abc"}

        def epoch_a(model, opt, sched, loss_fn, _):
            for b in batches:  # (a) the model alone on float tensors already in memory
                _step(model, opt, sched, loss_fn, x_float[b], y[b])

        data = TrainData(x_u8, y, x_u8[:0], y[:0], [], size)

        def epoch_b(model, opt, sched, loss_fn, epoch):  # (b) multitag's data path and training loop
            train_one_epoch(Run(model, model, opt, sched, loss_fn, device, gen), data, p, epoch)

        def epoch_c(model, opt, sched, loss_fn, _):
            for b in batches:  # (c) PIL decode + resize of every image of every batch, every epoch
                arrays = [np.asarray(Image.open(f).convert("RGB").resize((size, size))) for f in paths[b]]
                x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255)
                _step(model, opt, sched, loss_fn, x, y[b])

        # The rows take turns epoch by epoch, so a slower or busier stretch of the machine hits all three.
        seconds = dict.fromkeys("abc", 0.0)
        for epoch in range(1, args.epochs + 1):
            for key, run_epoch in (("a", epoch_a), ("b", epoch_b), ("c", epoch_c)):
                start = time.perf_counter()
                run_epoch(*setups[key], epoch)
                seconds[key] += time.perf_counter() - start
        rows = {key: used / t for key, t in seconds.items()}

    print(f"{n} JPEG photos {args.source_size}x{args.source_size} -> {args.image_size} px, model {p.model}, "
          f"batch {bs}, {args.epochs} epochs, augment {p.augment.preset or 'custom'}, "
          f"{torch.get_num_threads()} CPU threads")
    print(f"{'row':<58}{'images/s':>10}")
    for key, label in (("a", "(a) model alone, tensors in memory (ceiling)"),
                       ("b", "(b) multitag data path (uint8 shards, batch augment)"),
                       ("c", "(c) seed data path (PIL decode + resize per sample)")):
        print(f"{label:<58}{rows[key]:>10.0f}")
    print(f"ratio b/a: {rows['b'] / rows['a']:.3f}   ratio b/c: {rows['b'] / rows['c']:.2f}")


if __name__ == "__main__":
    main()
