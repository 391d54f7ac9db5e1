"""Seed recipe against multitag's default recipe: same data, same test split, same wall-clock budget.

    .venv/bin/python bench/quality.py                      # the built-in sample data (params.yaml)
    .venv/bin/python bench/quality.py --annotations DIR_OR_FILE [--images DIR] [--format coco]

The seed recipe is what the tutorials this project grew from write by hand, implemented faithfully
in PyTorch: the Keras-style CNN (Conv32 -> Conv64 -> MaxPool -> Flatten -> Dense, sigmoid outputs;
`simple_cnn`), binary cross-entropy, Adam (lr 1e-3), batch 32, a fixed 0.5 threshold, and every
image decoded and resized with PIL in the training process on every epoch.

multitag's recipe is params.yaml's (ingest, labels, train, evaluate stages called directly). Its
wall time (ingest + labels + train + evaluate) is the budget; the seed recipe then trains for the
same number of seconds (whole batches until the budget is spent; its test-set scoring is not
counted). Both are scored on multitag's test split (content-hash split) with the same metrics.
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

from multitag.config import load_params
from multitag.evaluate import evaluate, score_split
from multitag.ingest import MANIFEST, images_root, ingest
from multitag.labels import TARGETS, make_labels
from multitag.models import build_model, predict_scores
from multitag.sample_data import write_sample_data
from multitag.train import load_split, train

ROOT = Path(__file__).resolve().parents[1]


def seed_batch(paths: list[Path], size: int) -> torch.Tensor:
    """The seed data path: PIL decode + resize per image, every time it is used (uint8 NHWC)."""
    return torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB").resize((size, size)))
                                      for p in paths]))


def seed_recipe(train_paths, y_train, test_paths, size: int, budget: float, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("simple_cnn", y_train.shape[1], size)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.BCEWithLogitsLoss()
    start, epochs, steps = time.perf_counter(), 0, 0
    device = torch.device("cpu")
    while time.perf_counter() - start < budget:
        order = np.random.default_rng(seed + epochs).permutation(len(train_paths))
        for i in range(0, len(order), 32):
            idx = order[i:i + 32]
            x = seed_batch([train_paths[j] for j in idx], size).permute(0, 3, 1, 2).float() / 255
            model.train()
            loss = loss_fn(model(x), torch.from_numpy(y_train[idx]).float())
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            if time.perf_counter() - start >= budget:
                break
        epochs += 1
    trained = time.perf_counter() - start
    scores = np.concatenate([predict_scores(model, seed_batch(test_paths[i:i + 256], size), device)
                             for i in range(0, len(test_paths), 256)])
    return scores, trained, epochs, steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--annotations", help="annotations file or VOC folder (default: the built-in sample data)")
    ap.add_argument("--images", default="", help="image folder (default: next to the annotations)")
    ap.add_argument("--format", default="auto")
    ap.add_argument("--image-column", default=None)
    ap.add_argument("--tags-column", default=None)
    ap.add_argument("--delimiter", default=None)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    args = ap.parse_args()
    params = load_params(args.params)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        overrides = {"cache": None, "format": args.format}
        if args.annotations:
            overrides.update(annotations=args.annotations, images=args.images)
            for key in ("image_column", "tags_column", "delimiter"):
                if getattr(args, key) is not None:
                    overrides[key] = getattr(args, key)
            name = args.annotations
        else:
            sample = write_sample_data(params.sample, tmp / "sample")
            overrides.update(annotations=str(tmp / "sample" / "annotations.csv"), images=str(tmp / "sample" / "images"))
            name = f"built-in sample data ({sample.images} images)"
        p_ingest = params.ingest.model_copy(update=overrides)

        start = time.perf_counter()
        fmt = ingest(p_ingest, tmp / "prepared", tmp / "reports").format
        make_labels(tmp / "prepared", tmp / "labels", tmp / "reports")
        fit = train(params.train, tmp / "prepared", tmp / "labels", tmp / "models", tmp / "reports")
        ours = evaluate(params.evaluate, tmp / "models" / "model.pt", tmp / "prepared", tmp / "labels",
                        tmp / "reports")["test"]
        budget = time.perf_counter() - start

        manifest = pd.read_parquet(tmp / "prepared" / MANIFEST)
        y = np.load(tmp / "labels" / TARGETS)
        root = Path(images_root(p_ingest, fmt))
        paths = np.array([root / s for s in manifest["source"]], dtype=object)
        tr, te = (manifest["split"] == "train").to_numpy(), (manifest["split"] == "test").to_numpy()
        scores, trained, epochs, steps = seed_recipe(list(paths[tr]), y[tr], list(paths[te]), p_ingest.image_size,
                                                     budget, params.train.seed)
        seed, _, _ = score_split(y[te], scores, np.full(y.shape[1], 0.5))
        _, y_test, _ = load_split(tmp / "prepared", tmp / "labels", "test")
        assert np.array_equal(y_test.numpy(), y[te])  # both scored on the same test images and labels

    t = params.train
    print(f"dataset: {name}; {int(tr.sum())} train / {int(te.sum())} test images, {y.shape[1]} labels, "
          f"{p_ingest.image_size} px; {torch.get_num_threads()} CPU threads")
    print(f"multitag: {t.model}, loss {t.loss}, EMA {t.ema_decay or 'off'}, augment {t.augment.preset or 'custom'}, "
          f"{t.schedule}, {fit.epochs_run} epochs, thresholds tuned on val ({params.evaluate.threshold_metric}); "
          f"wall time {budget:.0f} s")
    print(f"seed: simple_cnn, BCE, Adam 1e-3, batch 32, PIL decode per epoch, threshold 0.5; "
          f"{epochs} epoch(s) ({steps} steps) in {trained:.0f} s")
    print(f"{'metric':<14}{'seed':>9}{'multitag':>10}{'difference':>12}")
    for key, label in (("map", "test mAP"), ("micro_f1", "micro-F1"), ("macro_f1", "macro-F1"),
                       ("hamming_loss", "Hamming loss")):
        print(f"{label:<14}{seed[key]:>9.4f}{ours[key]:>10.4f}{ours[key] - seed[key]:>+12.4f}")
    print(f"ratio: test mAP multitag - seed = {100 * (ours['map'] - seed['map']):+.1f} points "
          f"at the same wall-clock budget ({budget:.0f} s)")


if __name__ == "__main__":
    main()
