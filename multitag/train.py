"""Train stage: a multi-label classifier from the uint8 shards and the multi-hot targets.

One sigmoid output per label; BCE (optional pos_weight), focal or asymmetric loss; AdamW without
weight decay on norms and biases; one-cycle or warm-up + cosine schedule stepped per batch;
augmentation on whole batches as tensors (affine crop/flips, colour jitter, cutout); an optional
EMA of the weights, validated beside the raw weights (the better one is kept); optional frozen
backbone for the first epochs; early stopping on validation mAP. CUDA with bf16/fp16 autocast and
channels-last when present, CPU otherwise; optional torch.compile; DistributedDataParallel when
started by torch.distributed.run (train.devices > 1). A checkpoint is written atomically after
every epoch; a run started again with the same params and data resumes from it.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from multitag.config import AugmentParams, TrainParams
from multitag.ingest import MANIFEST, SHARDS
from multitag.labels import TARGETS, VOCABULARY
from multitag.losses import ModelEma, make_loss
from multitag.metrics import mean_ap
from multitag.models import build_model, predict_scores, save_model_file, state_digest, to_input

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
CHECKPOINT = "checkpoints/last.pt"


@dataclass(frozen=True)
class TrainResult:
    epochs_run: int
    best_epoch: int
    best_val_map: float
    resumed_from_epoch: int
    device: str
    seconds: float


def select_device(preference: str = "auto") -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available (use 'auto' or 'cpu')")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


class ShardSplit:
    """One split's images, gathered per batch straight from the memory-mapped uint8 shards (the
    ``train.workers > 0`` path, for splits larger than memory): ``split[idx]`` is a uint8 NHWC tensor."""

    def __init__(self, prepared_dir: Path, rows: pd.DataFrame):
        self.dir, self.shard, self.offset = prepared_dir, rows["shard"].to_numpy(), rows["offset"].to_numpy()
        self._maps: dict[int, np.ndarray] = {}
        first = self._map(int(self.shard[0])) if len(self.shard) else np.zeros((0, 1, 1, 3), np.uint8)
        self.shape = (len(self.shard), *first.shape[1:])

    def _map(self, shard: int) -> np.ndarray:
        if shard not in self._maps:
            self._maps[shard] = np.load(self.dir / SHARDS / f"{shard:05d}.npy", mmap_mode="r")
        return self._maps[shard]

    def __getstate__(self) -> dict:  # sent to worker processes: each maps the shards itself
        return {**self.__dict__, "_maps": {}}

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> torch.Tensor:
        idx = np.asarray(idx)
        out = np.empty((len(idx), *self.shape[1:]), np.uint8)
        for shard in np.unique(self.shard[idx]):
            here = self.shard[idx] == shard
            out[here] = self._map(int(shard))[self.offset[idx[here]]]
        return torch.from_numpy(out)


def load_split(prepared_dir: str | Path, labels_dir: str | Path | None, split: str, in_memory: bool = True):
    """(images uint8 NHWC, targets float or None, manifest rows) of one split, read from the shards
    (``in_memory=False``: a ShardSplit that reads each batch from them when asked)."""
    prepared_dir = Path(prepared_dir)
    manifest = pd.read_parquet(prepared_dir / MANIFEST)
    rows = manifest.index[manifest["split"] == split].to_numpy()
    targets = None
    if labels_dir is not None:
        targets = torch.from_numpy(np.load(Path(labels_dir) / TARGETS)[rows].astype(np.float32))
    if not in_memory:
        return ShardSplit(prepared_dir, manifest.loc[rows]), targets, manifest.loc[rows]
    parts = []
    for shard, group in manifest.loc[rows].groupby("shard", sort=True):
        arr = np.load(prepared_dir / SHARDS / f"{shard:05d}.npy", mmap_mode="r")
        parts.append(np.asarray(arr[group["offset"].to_numpy()]))
    images = np.concatenate(parts) if parts else np.zeros((0, 1, 1, 3), np.uint8)
    # groupby(sort=True) walks shards in order and rows are sorted within each shard, so
    # ``images`` follows ``rows`` (manifest order); targets are indexed the same way.
    return torch.from_numpy(images), targets, manifest.loc[rows]


class _Chunks(torch.utils.data.Dataset):
    def __init__(self, images, chunks):
        self.images, self.chunks = images, chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[self.chunks[i]]


def _batches(images, chunks: list, workers: int, device: torch.device):
    """The uint8 images of each chunk of indices: gathered in this process, or by ``workers``
    DataLoader processes (straight from the shards for a ShardSplit); page-locked on CUDA."""
    pin = device.type == "cuda"
    if not workers:
        for idx in chunks:
            yield images[idx].pin_memory() if pin else images[idx]
        return
    # Its own generator: the workers' seeds must not be drawn from the global one (dropout's).
    # Spawned, not forked: a fork of a process running threads (Prefect's, in-process flows) can
    # leave the children broken.
    yield from torch.utils.data.DataLoader(_Chunks(images, chunks), batch_size=None, num_workers=workers,
                                           pin_memory=pin, generator=torch.Generator().manual_seed(0),
                                           multiprocessing_context="spawn")


def augment(x: torch.Tensor, aug: AugmentParams, gen: torch.Generator) -> torch.Tensor:
    """Augment a whole batch (float NCHW in [0, 1]) at once: random resized crop and flips as one
    affine resampling, then colour jitter and cutout, each image with its own random draw."""
    n = x.shape[0]
    if aug.random_resized_crop or aug.hflip or aug.vflip:
        theta = torch.zeros(n, 2, 3)
        sx = sy = torch.ones(n)
        tx = ty = torch.zeros(n)
        if aug.random_resized_crop:
            lo, hi = aug.crop_scale
            area = lo + (hi - lo) * torch.rand(n, generator=gen)
            ratio = torch.exp((torch.rand(n, generator=gen) - 0.5) * 2 * math.log(4 / 3))
            sx = torch.sqrt(area * ratio).clamp(max=1.0)
            sy = torch.sqrt(area / ratio).clamp(max=1.0)
            tx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - sx)
            ty = (torch.rand(n, generator=gen) * 2 - 1) * (1 - sy)
        if aug.hflip:
            sx = sx * torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
        if aug.vflip:
            sy = sy * torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, tx, sy, ty
        grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="reflection", align_corners=False)
    if aug.color_jitter:
        f = (1 + (torch.rand(n, 3, generator=gen) * 2 - 1) * aug.color_jitter).to(x.device, x.dtype)
        brightness, contrast, saturation = (f[:, i].view(n, 1, 1, 1) for i in range(3))
        x = x * brightness
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * contrast + mean
        grey = x.mean(dim=1, keepdim=True)
        x = ((x - grey) * saturation + grey).clamp(0, 1)
    if aug.cutout:
        h, w = x.shape[2:]
        half = max(1, round(aug.cutout * min(h, w))) / 2
        cy, cx = (torch.rand(n, generator=gen) * h).view(n, 1, 1), (torch.rand(n, generator=gen) * w).view(n, 1, 1)
        ys, xs = torch.arange(h).view(1, h, 1) + 0.5, torch.arange(w).view(1, 1, w) + 0.5
        hole = ((ys - cy).abs() < half) & ((xs - cx).abs() < half)
        x = x.masked_fill(hole.unsqueeze(1).to(x.device), 0.5)
    return x


def make_optimizer(model: nn.Module, p: TrainParams) -> torch.optim.Optimizer:
    """AdamW; norm weights and biases (1-d tensors) get no weight decay."""
    decay = [t for t in model.parameters() if t.requires_grad and t.ndim > 1]
    no_decay = [t for t in model.parameters() if t.requires_grad and t.ndim <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": p.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=p.lr)


def make_scheduler(opt: torch.optim.Optimizer, p: TrainParams, steps_per_epoch: int):
    total = p.epochs * steps_per_epoch
    warmup = min(int(p.warmup_epochs * steps_per_epoch), total - 1)
    if p.schedule == "onecycle" and total >= 4:  # OneCycleLR needs >= 2 steps in each phase
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=p.lr, total_steps=total,
                                                   pct_start=min(max(warmup, 2), total - 2) / total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _amp(device: torch.device):
    if device.type != "cuda":
        return None, None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return dtype, scaler


def train_one_epoch(model, images, targets, opt, sched, loss_fn, p: TrainParams, device, gen, scaler,
                    amp_dtype, epoch: int, forward=None, ema: ModelEma | None = None) -> float:
    """One pass over the shuffled training split (this rank's share of it under DDP); returns the
    mean loss. ``forward`` is the model itself or its DDP and/or torch.compile wrapper."""
    forward = model if forward is None else forward
    model.train()
    order = torch.randperm(len(images), generator=gen)  # the same on every rank (same seed) ...
    if dist.is_initialized():  # ... each takes its own share of it
        order = order[dist.get_rank()::dist.get_world_size()]
    steps = len(order) // p.batch_size or 1  # drop the ragged last batch (BatchNorm needs >1 image)
    total = 0.0
    chunks = [order[step * p.batch_size:(step + 1) * p.batch_size] for step in range(steps)]
    # batches first: zip then runs the DataLoader to its end, which shuts its workers down cleanly
    bar = tqdm(zip(_batches(images, chunks, p.workers, device), chunks), total=steps, desc=f"epoch {epoch}",
               unit="batch", leave=False, disable=not sys.stderr.isatty())
    for xb, idx in bar:
        yb = targets[idx]
        if device.type == "cuda":  # page-locked batches: the copies to the GPU run asynchronously
            yb = yb.pin_memory()
        x = augment(to_input(xb, device), p.augment, gen)
        y = yb.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = loss_fn(forward(x).float(), y)
        opt.zero_grad(set_to_none=True)
        if scaler:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        sched.step()
        if ema is not None:
            ema.update(model)
        total += loss.item()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return total / steps


def _init_distributed(device: torch.device) -> torch.device:
    """Join the process group torch.distributed.run set up: NCCL and one GPU per process on CUDA,
    gloo on CPU. Returns this process's device."""
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return torch.device("cuda", local)
    dist.init_process_group("gloo")
    return device


def _val_map(model: nn.Module, x_val, y_val, device) -> float:
    return mean_ap(y_val.numpy(), predict_scores(model, x_val, device)) if len(x_val) else float("nan")


def head_parameters(model: nn.Module) -> list[torch.Tensor]:
    """The label head's parameters: those of the model's last Linear layer (torchvision's fc,
    classifier[-1] or heads.head; the classifier of the local models)."""
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise ValueError("train.freeze_epochs: the model has no Linear label head to train alone")
    return list(linear[-1].parameters())


def fingerprint(p: TrainParams, prepared_dir: Path, labels_dir: Path) -> str:
    """Identity of a training run: params, data and training code. A checkpoint is resumed only
    if this matches (a code change must retrain, not re-export an old run)."""
    from multitag import models
    h = hashlib.sha256(json.dumps(p.model_dump(mode="json"), sort_keys=True).encode())
    for f in (prepared_dir / MANIFEST, labels_dir / TARGETS, labels_dir / VOCABULARY, Path(__file__),
              Path(models.__file__)):
        h.update(f.read_bytes())
    return h.hexdigest()


def _save_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _write_history(history: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["epoch", "train_loss", "val_map", "val_map_raw", "val_map_ema", "kept",
                                          "lr", "seconds"])
        w.writeheader()
        w.writerows(history)


def train(p: TrainParams, prepared_dir: str | Path = "data/prepared", labels_dir: str | Path = "data/labels",
          out_dir: str | Path = "models", reports_dir: str | Path = "reports", image_size: int | None = None,
          stop_after_epochs: int | None = None, init: tuple[nn.Module, dict] | None = None) -> TrainResult:
    """Train and write ``models/model.pt`` (best validation-mAP weights) and the training history.

    ``init``: (model, metadata) of a registered version to fine-tune from (``train.init_from``);
    it must have the same architecture and label vocabulary.
    ``stop_after_epochs`` ends the run early as if interrupted (used to test resuming)."""
    start = time.time()
    prepared_dir, labels_dir, out_dir, reports_dir = map(Path, (prepared_dir, labels_dir, out_dir, reports_dir))
    device = select_device(p.device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torch.distributed.run (train.devices > 1)
        device = _init_distributed(device)
    lead = not dist.is_initialized() or dist.get_rank() == 0  # writes checkpoints, model and reports
    vocabulary = json.loads((labels_dir / VOCABULARY).read_text())["labels"]
    x_train, y_train, _ = load_split(prepared_dir, labels_dir, "train", in_memory=not p.workers)
    x_val, y_val, _ = load_split(prepared_dir, labels_dir, "val")
    if len(x_train) == 0:
        raise ValueError("the train split is empty: add images or lower ingest.val_fraction/test_fraction")
    image_size = image_size or x_train.shape[1]

    torch.manual_seed(p.seed)
    gen = torch.Generator().manual_seed(p.seed)
    model = build_model(p.model, len(vocabulary), image_size, p.pretrained)
    model.tta = p.eval_augment
    if init is not None:
        start_model, meta = init
        if (meta["arch"], meta["labels"], meta["image_size"]) != (p.model, vocabulary, image_size):
            raise ValueError(f"train.init_from: version {p.init_from} is a {meta['arch']} at {meta['image_size']} px "
                             f"with labels {meta['labels']}; this run trains a {p.model} at {image_size} px with "
                             f"labels {vocabulary} (set train.init_from: null to train from scratch)")
        model.load_state_dict(start_model.state_dict())
        log.info("starting from registered version %d", p.init_from)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, p)
    world = dist.get_world_size() if dist.is_initialized() else 1
    steps_per_epoch = len(x_train) // world // p.batch_size or 1
    sched = make_scheduler(opt, p, steps_per_epoch)
    loss_fn = make_loss(p, y_train).to(device)
    amp_dtype, scaler = _amp(device)
    ema = ModelEma(model, p.ema_decay) if p.ema_decay else None
    ema_model = copy.deepcopy(model) if ema else None  # holds the EMA weights for validation
    if dist.is_initialized():
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        forward = model
    forward = torch.compile(forward) if p.compile else forward
    head = head_parameters(model)

    ckpt_path = out_dir / CHECKPOINT
    fp = fingerprint(p, prepared_dir, labels_dir)
    state = {"epoch": 0, "best_map": None, "best_epoch": 0, "bad_epochs": 0, "history": [], "stopped": False}
    best_weights = copy.deepcopy(model.state_dict())
    resumed = 0
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ckpt.get("fingerprint") == fp:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            gen.set_state(ckpt["generator"])
            torch.set_rng_state(ckpt["torch_rng"])  # dropout draws from the global generator
            if ema:
                ema.load_state_dict(ckpt["ema"])
            best_weights = ckpt["best_weights"]
            state = ckpt["state"]
            resumed = state["epoch"]
            log.info("resuming from %s after epoch %d", ckpt_path, resumed)
        else:
            log.info("ignoring %s: it belongs to other params or data", ckpt_path)

    log.info("training %s on %s: %d train / %d val images, %d labels, %d epochs max",
             p.model, device, len(x_train), len(x_val), len(vocabulary), p.epochs)
    while state["epoch"] < p.epochs and not state["stopped"]:
        if stop_after_epochs is not None and state["epoch"] >= stop_after_epochs:
            return TrainResult(state["epoch"], state["best_epoch"], state["best_map"], resumed, str(device),
                               time.time() - start)
        t0 = time.time()
        epoch = state["epoch"] + 1
        frozen = epoch <= p.freeze_epochs
        for t in model.parameters():  # a frozen backbone: only the label head learns
            t.requires_grad_(not frozen or any(t is h for h in head))
        loss = train_one_epoch(model, x_train, y_train, opt, sched, loss_fn, p, device, gen, scaler,
                               amp_dtype, epoch, forward, ema)
        raw_map = _val_map(model, x_val, y_val, device)
        ema_map = float("nan")
        if ema:
            ema_model.load_state_dict(ema.state)
            ema_map = _val_map(ema_model, x_val, y_val, device)
        kept = "ema" if ema and (math.isnan(raw_map) or ema_map >= raw_map) else "raw"
        val_map = ema_map if kept == "ema" else raw_map
        # No validation signal (no val images or no positives there): keep the latest weights.
        no_signal = math.isnan(val_map)
        improved = not no_signal and (state["best_map"] is None or val_map > state["best_map"])
        if improved or no_signal:
            state.update(best_map=val_map if improved else state["best_map"], best_epoch=epoch, bad_epochs=0)
            weights = ema.state if kept == "ema" else model.state_dict()
            best_weights = {k: v.detach().cpu().clone() for k, v in weights.items()}
        else:
            state["bad_epochs"] += 1
            state["stopped"] = state["bad_epochs"] >= p.patience
        state["epoch"] = epoch
        state["history"].append({"epoch": epoch, "train_loss": round(loss, 6), "val_map": round(val_map, 6),
                                 "val_map_raw": round(raw_map, 6), "val_map_ema": round(ema_map, 6) if ema else "",
                                 "kept": kept, "lr": opt.param_groups[0]["lr"], "seconds": round(time.time() - t0, 2)})
        log.info("epoch %d/%d  loss %.4f  val mAP %.4f%s%s%s  (%.1fs)", epoch, p.epochs, loss, raw_map,
                 f"  EMA {ema_map:.4f}" if ema else "", "  (head only)" if frozen else "",
                 "  *best*" if improved else "", time.time() - t0)
        if state["stopped"]:
            log.info("early stopping: no val mAP gain for %d epochs", p.patience)
        if lead:
            _save_checkpoint(ckpt_path, {
                "fingerprint": fp, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
                "ema": ema.state_dict() if ema else None, "best_weights": best_weights, "state": state})

    result = TrainResult(state["epoch"], state["best_epoch"], state["best_map"], resumed, str(device),
                         round(time.time() - start, 1))
    if dist.is_initialized():
        log.info("rank %d/%d: final weights sha256 %s", dist.get_rank(), dist.get_world_size(),
                 state_digest(model.state_dict())[:16])
        dist.barrier()
        dist.destroy_process_group()
    if not lead:
        return result
    save_model_file(out_dir / MODEL_FILE, arch=p.model, labels=vocabulary, image_size=image_size,
                    state_dict=best_weights, params=p.model_dump(mode="json"),
                    best_epoch=state["best_epoch"], val_map=state["best_map"])
    _write_history(state["history"], reports_dir / "train_history.csv")
    (reports_dir / "train.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result
