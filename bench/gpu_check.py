"""The CUDA paths on a GPU machine: training (bf16 autocast, channels-last, page-locked batches, the
time budget, the ML-Decoder head, torch.compile, resnet18 at 96 px) on the hard data set, then each
CUDA-trained model scored on CPU and on the GPU and exported to ONNX (ONNX Runtime's probabilities
against PyTorch's). One line per row; a row that fails prints why, and its first steps' losses.

    python3 bench/gpu_check.py 4000 40                  # images of the hard set, training seconds per row
    ROWS=resnet18-photos@96 python3 bench/gpu_check.py 4000 40

Needs only what training needs (no Prefect, DVC or cleanlab), so it runs on a bare GPU image with
torch plus pydantic. DEV=cpu runs it here (a smoke test of the script).
"""
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from multitag.config import SampleParams, parse_params
from multitag.evaluate import evaluate
from multitag.ingest import ingest
from multitag.labels import make_labels
from multitag.layout import Layout
from multitag.models import load_model_file, predict_scores
from multitag.sample_data import write_sample_data
from multitag.serving import OnnxModel, export_onnx
from multitag.train import train

DEV = os.environ.get("DEV", "cuda")
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.is_available() and torch.cuda.get_device_name(0), flush=True)
params = parse_params({})  # the shipped defaults (params.yaml is the digits demo's)
tmp = Path(tempfile.mkdtemp(prefix="multitag-gpu-"))
t0 = time.time()
write_sample_data(SampleParams(preset="hard", n_images=int(sys.argv[1]), image_size=128), tmp / "data",
                  params.ingest.val_fraction, params.ingest.test_fraction)
print(f"hard data written in {time.time()-t0:.0f}s", flush=True)
base = params.ingest.model_copy(update={"annotations": str(tmp / "data/annotations.csv"), "images": str(tmp / "data/images")})
spaces = {}
rows = [("default@32", 32, {}), ("photos@32", 32, {"augment": {"preset": "photos"}}),
        ("photos-mldecoder@32", 32, {"augment": {"preset": "photos"}, "head": "mldecoder"}),
        ("photos-compile@32", 32, {"augment": {"preset": "photos"}, "compile": True}),
        ("resnet18-photos@96", 96, {"model": "resnet18", "augment": {"preset": "photos"}, "batch_size": 64})]
budget = float(sys.argv[2])
rows = [r for r in rows if r[0] in os.environ.get("ROWS", r[0]).split(",")]


def diag(ws):
    """Loss of the first steps: compiled or eager, AMP or fp32."""
    from multitag.models import build_model
    from multitag.train import augment, build, load_data, to_input
    for comp in (False, True):
        for amp in (True, False):
            p = params.train.model_validate({**params.train.model_dump(), "augment": {"preset": "photos"}, "compile": comp, "device": DEV})
            data = load_data(p, ws)
            torch.manual_seed(0)
            model = build_model(p.model, len(data.vocabulary), data.image_size)
            run = build(p, data, model, torch.device(DEV), 3)
            if not amp:
                run.amp_dtype = None
            losses = []
            for step in range(min(8, len(data.x_train) // 32)):
                idx = torch.arange(step * 32, step * 32 + 32)
                x = augment(to_input(data.x_train[idx], run.device), p.augment, run.gen)
                with torch.autocast(run.device.type, dtype=run.amp_dtype or torch.float32, enabled=run.amp_dtype is not None):
                    out = run.forward(x)
                    loss = run.loss_fn(out.float(), data.y_train[idx].to(run.device))
                losses.append(f"{loss.item():.3f}/{out.float().abs().max().item():.1f}")
                run.optimizer.zero_grad(set_to_none=True); loss.backward(); run.optimizer.step(); run.scheduler.step()
            print(f"DIAG compile={comp} amp={amp}: loss/max|logit| {' '.join(losses)}", flush=True)
for name, size, changes in rows:
    if size not in spaces:
        ws = Layout(tmp / f"ws{size}")
        t0 = time.time(); ingest(base.model_copy(update={"image_size": size}), ws); make_labels(ws)
        print(f"ingest {size}px: {time.time()-t0:.0f}s", flush=True)
        spaces[size] = ws
    ws = spaces[size]
    for f in (ws.model, ws.checkpoint):
        f.unlink(missing_ok=True)
    p = params.train.model_validate({**params.train.model_dump(), **changes, "time_budget_s": budget, "device": DEV})
    t0 = time.time()
    try:
        res = train(p, ws)
    except Exception as e:  # report and go on with the next row
        print(f"ROW {name} FAILED: {type(e).__name__}: {e}", flush=True)
        try:
            diag(ws)
        except Exception as e:
            print("DIAG failed", type(e).__name__, e, flush=True)
        continue
    wall = time.time() - t0
    metrics = evaluate(params.evaluate, ws)
    run_log = json.loads((ws.run_log / "train.json").read_text())
    summary = json.loads(ws.train_summary.read_text())
    manifest = pd.read_parquet(ws.manifest)
    te = (manifest["split"] == "test").to_numpy()
    x = np.concatenate([np.load(s) for s in sorted(ws.shards.glob("*.npy"))])[te][:512]
    net, meta = load_model_file(ws.model)
    cpu = predict_scores(net, x, torch.device("cpu"), tta=meta["tta"])
    gpu = predict_scores(net.to(DEV), x, torch.device(DEV), tta=meta["tta"])
    try:
        ort = OnnxModel(export_onnx(ws.model, tmp / f"{name}.onnx")).probabilities(x)
    except Exception as e:
        print(f"ROW {name} EXPORT FAILED: {type(e).__name__}: {str(e)[-300:]}", flush=True); ort = np.full_like(cpu, np.nan)
    print(f"ROW {name}: device {run_log['device']} planned {summary.get('planned_epochs')} epochs / "
          f"{summary.get('planned_seconds')}s, actual {summary.get('seconds')}s (wall {wall:.0f}s, budget {budget:.0f}); "
          f"epochs run {summary['epochs_run']}, best {summary['best_epoch']} val mAP {summary['best_val_map']:.4f}; test mAP {metrics['test']['map']:.4f} tail {metrics['buckets']['tail']['map']:.4f}; "
          f"|cpu-cuda| max {np.abs(cpu-gpu).max():.2e}; |torch-onnx| max {np.abs(cpu-ort).max():.2e} on {len(x)} images",
          flush=True)
shutil.rmtree(tmp, ignore_errors=True)
