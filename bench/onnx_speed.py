"""Prediction speed: eager PyTorch against ONNX Runtime on the exported model, side by side.

    .venv/bin/python bench/onnx_speed.py --images 512

For each model (the shipped default at params.yaml's image size, and resnet18 at 224 px, both with
random weights: speed does not depend on them), the same uint8 images are scored in batches of 64 by
multitag's eager path (models.predict_scores) and by the model.onnx that registration writes
(serving.OnnxModel), alternating rounds so that a busy stretch of the machine hits both. Prints
images/s and the ratio ONNX Runtime / eager last.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from multitag.config import load_params
from multitag.models import build_model, predict_scores, save_model_file
from multitag.serving import OnnxModel, export_onnx

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    params = load_params(ROOT / "params.yaml")
    models = [(params.train.model, params.ingest.image_size), ("resnet18", 224)]
    print(f"{args.images} images per round, {args.rounds} rounds, batch 64; {torch.get_num_threads()} CPU threads")
    print(f"{'model':<28}{'eager img/s':>12}{'onnx img/s':>12}{'ratio':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for arch, size in models:
            torch.manual_seed(0)
            file = Path(tmp) / f"{arch}.pt"
            save_model_file(file, arch=arch, labels=[f"l{i}" for i in range(20)], image_size=size,
                            state_dict=build_model(arch, 20, size).state_dict())
            onnx_model = OnnxModel(export_onnx(file, Path(tmp) / f"{arch}.onnx"))
            net = build_model(arch, 20, size)
            net.load_state_dict(torch.load(file, weights_only=True)["state_dict"])
            images = np.random.default_rng(0).integers(0, 256, (args.images, size, size, 3), dtype=np.uint8)
            seconds = {"eager": 0.0, "onnx": 0.0}
            predict_scores(net, images[:64], torch.device("cpu"), batch_size=64)  # warm-up, not timed
            onnx_model.probabilities(images[:64], batch_size=64)
            for _ in range(args.rounds):
                t = time.perf_counter()
                eager = predict_scores(net, images, torch.device("cpu"), batch_size=64)
                seconds["eager"] += time.perf_counter() - t
                t = time.perf_counter()
                runtime = onnx_model.probabilities(images, batch_size=64)
                seconds["onnx"] += time.perf_counter() - t
            assert np.abs(eager - runtime).max() < 1e-4  # the same probabilities
            rate = {k: args.images * args.rounds / v for k, v in seconds.items()}
            print(f"{arch + f' at {size} px':<28}{rate['eager']:>12.0f}{rate['onnx']:>12.0f}"
                  f"{rate['onnx'] / rate['eager']:>8.2f}")
    print("ratio: ONNX Runtime / eager PyTorch images per second, per row above")


if __name__ == "__main__":
    main()
