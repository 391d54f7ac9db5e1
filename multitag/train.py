"""Train stage: a multi-label classifier from the uint8 shards and the multi-hot targets.

The pieces, in the order ``train()`` uses them (as in torchvision's reference scripts):
``load_data`` -> ``resolve_init`` (where the starting weights come from) -> ``build`` (optimizer,
schedule, loss, EMA, DDP/compile wrappers: a ``Run``) -> per epoch ``train_one_epoch`` and
``validate`` -> the ``Checkpointer`` saves everything needed to resume after each epoch.

One sigmoid output per label; BCE (optional pos_weight), focal or asymmetric loss; AdamW without
weight decay on norms and biases; one-cycle or warm-up + cosine schedule stepped per batch; batch
augmentation as tensors (multitag/augment.py); an optional EMA of the weights, validated beside the
raw weights (the better one is kept); an optional frozen backbone for the first epochs; early
stopping on validation mAP. CUDA with bf16/fp16 autocast and channels-last when present, CPU
otherwise; DistributedDataParallel when started by torch.distributed.run (train.devices > 1).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from multitag import distributed
from multitag.augment import augment, mixup
from multitag.config import Params, TrainParams
from multitag.dataset import load_split, select_device
from multitag.layout import Layout
from multitag.losses import ModelEma, make_loss
from multitag.metrics import mean_ap
from multitag.models import (MLDecoder, build_model, load_registered, predict_scores, save_atomic, save_model_file,
                             state_digest, to_input)
from multitag.registry import open_registry
from multitag.report import read_json, write_csv, write_json
from multitag.storage import open_store

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ["epoch", "train_loss", "val_map", "val_map_raw", "val_map_ema", "kept", "lr"]


@dataclass(frozen=True)
class TrainResult:
    """reports/train.json: a function of params and data alone (timings go to the run log), except
    with train.time_budget_s, whose epochs depend on the machine's speed: then it also holds the
    planned and actual seconds."""
    epochs_run: int
    best_epoch: int
    best_val_map: float | None
    stopped_early: bool
    time_budget_s: float | None = None
    planned_epochs: int | None = None
    planned_seconds: float | None = None
    seconds: float | None = None


@dataclass
class TrainState:
    """Progress a checkpoint restores: the epochs planned, the epoch reached, the best validation mAP
    so far, early stopping."""
    epochs: int = 1
    planned_seconds: float | None = None
    epoch: int = 0
    best_map: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped: bool = False
    history: list[dict] = field(default_factory=list)


@dataclass
class TrainData:
    x_train: object          # uint8 NHWC tensor, or a ShardSplit (train.workers > 0)
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    vocabulary: list[str]
    image_size: int


@dataclass
class Run:
    """What one training run updates: the model and what steps it."""
    model: nn.Module         # the plain model: its weights are saved
    forward: nn.Module       # the model, or its DDP / torch.compile wrapper
    optimizer: torch.optim.Optimizer
    scheduler: object
    loss_fn: nn.Module
    device: torch.device
    gen: torch.Generator     # shuffling and augmentation draws
    ema: ModelEma | None = None
    ema_model: nn.Module | None = None  # holds the EMA weights while they are validated
    amp_dtype: torch.dtype | None = None
    scaler: object = None


def load_data(p: TrainParams, layout: Layout) -> TrainData:
    vocabulary = read_json(layout.vocabulary)["labels"]
    x_train, y_train, _ = load_split(layout, "train", in_memory=not p.workers)
    x_val, y_val, _ = load_split(layout, "val")
    if len(x_train) == 0:
        raise ValueError("the train split is empty: add images or lower ingest.val_fraction/test_fraction")
    if not vocabulary or not y_train.any():
        raise ValueError(f"nothing to learn: no label has a positive image in the train split ({len(x_train)} "
                         "images, all negatives); check the annotations' tags column and delimiter")
    return TrainData(x_train, y_train, x_val, y_val, vocabulary, x_train.shape[1])


class Checkpointer:
    """The checkpoint of an interrupted run: written atomically after every epoch (by the writing
    process only) and resumed only when its fingerprint (params, data, training code, starting
    weights) matches. A run on several nodes (``store`` given) keeps it in the store too, where every
    node finds it after a restart, and every rank resumes from the writer's copy."""

    def __init__(self, path: Path, fingerprint: str, writer: int = 0, store=None):
        self.path, self.fingerprint, self.writer, self.store = path, fingerprint, writer, store
        self.lead = not dist.is_initialized() or dist.get_rank() == writer
        self.key = f"checkpoints/{fingerprint[:16]}.pt"

    def load(self) -> dict | None:
        ckpt = self._load() if self.lead else None
        return _shared(ckpt, self.writer) if dist.is_initialized() else ckpt

    def _load(self) -> dict | None:
        if self.store is not None and self.store.exists(self.key):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.store.get_file(self.key, self.path)
        if not self.path.exists():
            return None
        ckpt = torch.load(self.path, map_location="cpu", weights_only=True)
        if ckpt.get("fingerprint") != self.fingerprint:
            log.info("ignoring %s: it belongs to other params, data or code", self.path)
            return None
        return ckpt

    def save(self, run: Run, state: TrainState, best_weights: dict) -> None:
        if self.lead:
            save_atomic({"fingerprint": self.fingerprint, "model": run.model.state_dict(),
                         "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                         "generator": run.gen.get_state(), "torch_rng": torch.get_rng_state(),
                         "ema": run.ema.state_dict() if run.ema else None, "best_weights": best_weights,
                         "state": asdict(state)}, self.path)
            if self.store is not None:
                self.store.put_file(self.key, self.path)

    @staticmethod
    def restore(run: Run, ckpt: dict) -> tuple[TrainState, dict]:
        """Put a loaded checkpoint's optimizer, schedule, generators and EMA back into ``run``
        (its model weights were loaded by resolve_init); returns (state, best weights)."""
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.scheduler.load_state_dict(ckpt["scheduler"])
        run.gen.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["torch_rng"])  # dropout draws from the global generator
        if run.ema:
            run.ema.load_state_dict(ckpt["ema"])
        return TrainState(**ckpt["state"]), ckpt["best_weights"]


def fingerprint(p: TrainParams, layout: Layout, init_from: int | None) -> str:
    """Identity of a training run: params, starting version, data and training code. A checkpoint is
    resumed only if this matches (a code change must retrain, not re-export an old run)."""
    from multitag import augment as augment_module
    from multitag import losses, models
    h = hashlib.sha256(json.dumps([p.model_dump(mode="json"), init_from], sort_keys=True).encode())
    for f in (layout.manifest, layout.targets, layout.vocabulary, Path(__file__), Path(models.__file__),
              Path(losses.__file__), Path(augment_module.__file__)):
        h.update(f.read_bytes())
    return h.hexdigest()


def resolve_init(p: TrainParams, data: TrainData, init_from: int | None, registry,
                 checkpointer: Checkpointer) -> tuple[nn.Module, str, dict | None]:
    """The model to start from, where its weights came from, and the checkpoint to resume (if any).

    In order: an interrupted run's checkpoint of the same fingerprint; a registered version
    (lineage.init_from, set by the retrain flow: same architecture, input size and labels); a
    pretrained weights file (train.pretrained: the backbone, the label head starts fresh); else random
    initialisation. Errors read ``<key>: <what is wrong>; <what to do>``."""
    pretrained = p.pretrained if init_from is None else None
    model = build_model(p.model, len(data.vocabulary), data.image_size, pretrained, p.head)
    ckpt = checkpointer.load()
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        return model, f"resumed from {checkpointer.path} after epoch {ckpt['state']['epoch']}", ckpt
    if init_from is not None:
        if registry is None:
            raise ValueError(f"lineage.init_from: version {init_from} needs the registry; no store was given")
        start, meta = load_registered(registry, init_from)
        want = (p.model, p.head, data.image_size, data.vocabulary)
        if (meta["arch"], meta.get("head", "linear"), meta["image_size"], meta["labels"]) != want:
            raise ValueError(f"lineage.init_from: version {init_from} is a {meta['arch']} ({meta.get('head', 'linear')} "
                             f"head) at {meta['image_size']} px with labels {meta['labels']}; this run trains a "
                             f"{want[0]} ({want[1]} head) at {want[2]} px with labels {want[3]}; train from scratch "
                             "instead (the retrain flow does when labels change)")
        model.load_state_dict(start.state_dict())
        return model, f"registered version {init_from}", None
    return model, f"pretrained weights {p.pretrained}" if p.pretrained else "random initialisation", None


def make_optimizer(model: nn.Module, p: TrainParams) -> torch.optim.Optimizer:
    """AdamW; norm weights and biases (1-d tensors) get no weight decay."""
    decay = [t for t in model.parameters() if t.requires_grad and t.ndim > 1]
    no_decay = [t for t in model.parameters() if t.requires_grad and t.ndim <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": p.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=p.lr)


def make_scheduler(opt: torch.optim.Optimizer, p: TrainParams, steps_per_epoch: int, epochs: int | None = None):
    total = (epochs or p.epochs) * steps_per_epoch
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


def steps_per_epoch(p: TrainParams, n_train: int) -> int:
    world = dist.get_world_size() if dist.is_initialized() else 1
    return n_train // world // p.batch_size or 1


def build(p: TrainParams, data: TrainData, model: nn.Module, device: torch.device, epochs: int) -> Run:
    """Optimizer, schedule over ``epochs``, loss, mixed precision, EMA and the DDP / compile wrappers
    around ``model``."""
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, p)
    scheduler = make_scheduler(optimizer, p, steps_per_epoch(p, len(data.x_train)), epochs)
    amp_dtype, scaler = _amp(device)
    ema = ModelEma(model, p.ema_decay) if p.ema_decay else None
    forward = model
    if dist.is_initialized():
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return Run(model=model, forward=torch.compile(forward) if p.compile else forward, optimizer=optimizer,
               scheduler=scheduler, loss_fn=make_loss(p, data.y_train).to(device), device=device,
               gen=torch.Generator().manual_seed(p.seed), ema=ema,
               ema_model=copy.deepcopy(model) if ema else None, amp_dtype=amp_dtype, scaler=scaler)


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


def train_step(run: Run, xb: torch.Tensor, yb: torch.Tensor, p: TrainParams) -> torch.Tensor:
    """One optimizer step on a batch of uint8 images ``xb`` and their targets ``yb``: augmentation,
    the forward pass under mixed precision, backward and the step; returns the loss."""
    x = augment(to_input(xb, run.device), p.augment, run.gen)
    y = yb.to(run.device, non_blocking=True)
    if p.augment.mixup:
        x, y = mixup(x, y, p.augment.mixup, run.gen)
    with torch.autocast(run.device.type, dtype=run.amp_dtype or torch.float32, enabled=run.amp_dtype is not None):
        loss = run.loss_fn(run.forward(x).float(), y)
    run.optimizer.zero_grad(set_to_none=True)
    if run.scaler:
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        loss.backward()
        run.optimizer.step()
    return loss


def train_one_epoch(run: Run, data: TrainData, p: TrainParams, epoch: int) -> float:
    """One pass over the shuffled training split (this rank's share of it under DDP); returns the
    mean loss."""
    run.model.train()
    order = torch.randperm(len(data.x_train), generator=run.gen)  # the same on every rank (same seed) ...
    if dist.is_initialized():  # ... each takes its own share of it
        order = order[dist.get_rank()::dist.get_world_size()]
    steps = len(order) // p.batch_size or 1  # drop the ragged last batch (BatchNorm needs >1 image)
    chunks = [order[step * p.batch_size:(step + 1) * p.batch_size] for step in range(steps)]
    total = 0.0
    # batches first: zip then runs the DataLoader to its end, which shuts its workers down cleanly
    bar = tqdm(zip(_batches(data.x_train, chunks, p.workers, run.device), chunks), total=steps,
               desc=f"epoch {epoch}", unit="batch", leave=False, disable=not sys.stderr.isatty())
    for xb, idx in bar:
        yb = data.y_train[idx]
        if run.device.type == "cuda":  # page-locked batches: the copies to the GPU run asynchronously
            yb = yb.pin_memory()
        loss = train_step(run, xb, yb, p)
        if not torch.isfinite(loss):
            raise ValueError(f"train: the loss became {loss.item()} in epoch {epoch}; lower train.lr or "
                             f"change train.loss ({p.loss}) and its settings" +
                             ("; or set train.compile: false (compiled bf16 training gave nan losses with "
                              "torch 2.11 on a GPU)" if p.compile and run.amp_dtype else ""))
        run.scheduler.step()
        if run.ema is not None:
            run.ema.update(run.model)
        total += loss.item()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return total / steps


def _val_map(model: nn.Module, data: TrainData, p: TrainParams, device) -> float:
    scores = predict_scores(model, data.x_val, device, tta=p.eval_augment)
    if not np.isfinite(scores).all():
        raise ValueError(f"train: the model's outputs became non-finite; lower train.lr ({p.lr}) or change "
                         f"train.loss ({p.loss}) and its settings")
    return mean_ap(data.y_val.numpy(), scores) if len(data.x_val) else float("nan")


def validate(run: Run, data: TrainData, p: TrainParams) -> dict:
    """Validation mAP of the raw weights and, with EMA, of the averaged ones; ``kept`` names the better."""
    raw = _val_map(run.model, data, p, run.device)
    ema = float("nan")
    if run.ema:
        run.ema_model.load_state_dict(run.ema.state)
        ema = _val_map(run.ema_model, data, p, run.device)
    kept = "ema" if run.ema and (math.isnan(raw) or ema >= raw) else "raw"
    return {"val_map": ema if kept == "ema" else raw, "val_map_raw": raw, "val_map_ema": ema, "kept": kept}


def fit_epochs(p: TrainParams, data: TrainData, model: nn.Module, device: torch.device, seconds: float,
               probe_steps: int = 12) -> tuple[int, float]:
    """(epochs, their planned seconds) that fit ``seconds`` of training, from timed steps of a copy of
    the model (training steps with augmentation, one validation pass): the schedule is then built
    for that many epochs, so the run ends on time with its learning rate annealed."""
    probe = copy.deepcopy(model).to(device)
    forward = torch.compile(probe) if p.compile else probe
    amp_dtype, scaler = _amp(device)
    probe_run = Run(probe, forward, make_optimizer(probe, p), None, make_loss(p, data.y_train).to(device), device,
                    torch.Generator().manual_seed(p.seed + 1), amp_dtype=amp_dtype, scaler=scaler)
    size = min(p.batch_size, len(data.x_train))
    timings = []
    for step in range(probe_steps + 1):  # the first step is a warm-up (and compilation), not counted
        idx = torch.randint(len(data.x_train), (size,), generator=probe_run.gen)
        t0 = time.perf_counter()
        train_step(probe_run, data.x_train[idx], data.y_train[idx], p)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # GPU work is queued: time it done, not launched
        timings.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    predict_scores(probe, data.x_val, device, tta=p.eval_augment)
    validation = (time.perf_counter() - t0) * (2 if p.ema_decay else 1)
    per_epoch = steps_per_epoch(p, len(data.x_train)) * float(np.median(timings[1:])) + validation
    compiling = timings[0] if p.compile else 0.0  # the run compiles its own model once more
    epochs = int(min(10_000, max(1, (seconds * 0.95 - compiling) // per_epoch)))
    log.info("time budget: %.0f s left at about %.1f s per epoch%s: %d epochs planned", seconds, per_epoch,
             f" after {compiling:.0f} s of compilation" if p.compile else "", epochs)
    return epochs, round(epochs * per_epoch + compiling, 1)


def _shared(value, src: int = 0):
    """Rank ``src``'s ``value`` on every rank under DDP (timed plans and validation scores may differ
    between processes, yet every rank must run the same epochs and keep the same weights), else
    ``value``."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def average_buffers(run: Run) -> None:
    """Under DDP on CPU, where gloo has no SyncBatchNorm, average the float buffers (BatchNorm's
    running statistics) of the model and of its EMA over the ranks after each epoch: each rank
    updated them from its own batches, and the ranks must validate and keep the same weights. (The
    update is linear, so the mean is the running mean SyncBatchNorm would keep.)"""
    if not dist.is_initialized() or run.device.type == "cuda":  # CUDA: SyncBatchNorm (build)
        return
    names = [name for name, b in run.model.named_buffers() if b.dtype.is_floating_point]
    buffers = dict(run.model.named_buffers())
    for t in [buffers[n] for n in names] + ([run.ema.state[n] for n in names] if run.ema else []):
        dist.all_reduce(t)
        t.div_(dist.get_world_size())


def replan(run: Run, state: TrainState, p: TrainParams, n_train: int, left: float, epoch_seconds: float) -> None:
    """After the second epoch (the first holds one-time costs), fit the epochs to the budget again from
    that epoch's measured time, its checkpoint included: the probe's few steps miss what a whole epoch
    costs (resnet18 on a GPU ran 74% over its budget without this). Halfway through the plan it is
    fitted once more from the mean of the epochs since the first, as one epoch can be slower or faster
    than the rest (a run with 480 s on the hard set ended after 378). The schedule is rebuilt for the
    new count and set to the step reached."""
    # at least one epoch more, in which the schedule anneals (rather than stop at its peak)
    epochs = state.epoch + max(1, int(left * 0.95 // epoch_seconds)) if epoch_seconds > 0 else state.epochs
    epochs = _shared(min(epochs, 10_000))
    if epochs == state.epochs:
        return
    log.info("time budget: epoch %d took %.1f s: %d epochs planned instead of %d", state.epoch, epoch_seconds,
             epochs, state.epochs)
    done = run.scheduler.last_epoch
    run.scheduler = make_scheduler(run.optimizer, p, steps_per_epoch(p, n_train), epochs)
    run.scheduler.last_epoch = done - 1
    run.scheduler.step()
    state.planned_seconds = round(p.time_budget_s - left + (epochs - state.epoch) * epoch_seconds, 1)
    state.epochs = epochs


def head_parameters(model: nn.Module) -> list[torch.Tensor]:
    """The label head's parameters: an ML-Decoder's, or those of the model's last Linear layer
    (torchvision's fc, classifier[-1] or heads.head; the classifier of the local models)."""
    decoders = [m for m in model.modules() if isinstance(m, MLDecoder)]
    if decoders:
        return list(decoders[0].parameters())
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise ValueError("train.freeze_epochs: the model has no Linear label head to train alone")
    return list(linear[-1].parameters())


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


def _record(state: TrainState, run: Run, val: dict, loss: float, p: TrainParams) -> bool:
    """Update early stopping and the history with one epoch's results; True if these weights are
    the best so far (a tie goes to the later, longer-trained epoch) or there is no validation signal
    (then the latest weights are kept)."""
    no_signal = math.isnan(val["val_map"])
    improved = not no_signal and (state.best_map is None or val["val_map"] >= state.best_map)
    if improved or no_signal:
        state.best_map = val["val_map"] if improved else state.best_map
        state.best_epoch, state.bad_epochs = state.epoch, 0
    else:
        state.bad_epochs += 1
        state.stopped = state.bad_epochs >= p.patience and not p.time_budget_s  # a budget's schedule runs to its end
    state.history.append({"epoch": state.epoch, "train_loss": round(loss, 6), "val_map": round(val["val_map"], 6),
                          "val_map_raw": round(val["val_map_raw"], 6),
                          "val_map_ema": round(val["val_map_ema"], 6) if run.ema else "", "kept": val["kept"],
                          "lr": run.optimizer.param_groups[0]["lr"]})
    return improved or no_signal


def train(p: TrainParams, layout: Layout, init_from: int | None = None, registry=None,
          stop_after_epochs: int | None = None, store=None, on_epoch=None) -> TrainResult:
    """Train and write ``models/model.pt`` (the best validation-mAP weights), ``reports/train.json``
    and the per-epoch history; timings go to the run log (``.multitag/runs/train.json``).

    ``init_from``: a registered version to fine-tune from (``registry`` holds it).
    ``stop_after_epochs`` ends the run early as if interrupted (used to test resuming).
    ``store``: on several nodes, where the checkpoint is kept for every node (and on a Kubernetes
    training pod, where the writer puts the outputs).
    ``on_epoch(epoch, val_map)`` is called after each epoch (`multitag tune` reports to its pruner,
    which may stop the run by raising)."""
    start = time.time()
    device = select_device(p.device)
    writer = 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torch.distributed.run (train.devices > 1)
        device = _init_distributed(device)
        writer = distributed.writer_rank(p.rdzv_endpoint if p.nodes > 1 else None)
    data = load_data(p, layout)
    torch.manual_seed(p.seed)  # the initial weights, then dropout
    checkpointer = Checkpointer(layout.checkpoint, fingerprint(p, layout, init_from), writer, store)
    lead = checkpointer.lead  # writes checkpoints, model and reports
    model, source, ckpt = resolve_init(p, data, init_from, registry, checkpointer)
    if ckpt:
        epochs, planned = ckpt["state"]["epochs"], ckpt["state"]["planned_seconds"]
    elif p.time_budget_s:
        epochs, planned = _shared(fit_epochs(p, data, model, device, p.time_budget_s - (time.time() - start)))
    else:
        epochs, planned = p.epochs, None
    run = build(p, data, model, device, epochs)
    state, best_weights = (Checkpointer.restore(run, ckpt) if ckpt else
                           (TrainState(epochs, planned), copy.deepcopy(run.model.state_dict())))
    resumed, head, seconds, spent, halfway = state.epoch, head_parameters(run.model), [], [], 0
    log.info("training %s on %s (%s): %d train / %d val images, %d labels, %d epochs max", p.model, device,
             source, len(data.x_train), len(data.x_val), len(data.vocabulary), state.epochs)
    while state.epoch < state.epochs and not state.stopped:
        if stop_after_epochs is not None and state.epoch >= stop_after_epochs:
            return TrainResult(state.epoch, state.best_epoch, state.best_map, state.stopped)
        t0 = time.time()
        state.epoch += 1
        frozen = state.epoch <= p.freeze_epochs
        for t in run.model.parameters():  # a frozen backbone: only the label head learns
            t.requires_grad_(not frozen or any(t is h for h in head))
        loss = train_one_epoch(run, data, p, state.epoch)
        average_buffers(run)
        # rank 0 validates and its scores decide for every rank (best weights, early stopping)
        val = _shared(validate(run, data, p) if not dist.is_initialized() or dist.get_rank() == 0 else None)
        if _record(state, run, val, loss, p):
            weights = run.ema.state if val["kept"] == "ema" else run.model.state_dict()
            best_weights = {k: v.detach().cpu().clone() for k, v in weights.items()}
        seconds.append(round(time.time() - t0, 2))
        log.info("epoch %d/%d  loss %.4f  val mAP %.4f%s%s%s  (%.1fs)", state.epoch, state.epochs, loss,
                 val["val_map_raw"], f"  EMA {val['val_map_ema']:.4f}" if run.ema else "",
                 "  (head only)" if frozen else "", "  *best*" if state.best_epoch == state.epoch else "", seconds[-1])
        if state.stopped:
            log.info("early stopping: no val mAP gain for %d epochs", p.patience)
        checkpointer.save(run, state, best_weights)
        if on_epoch is not None:
            on_epoch(state.epoch, val["val_map"])
        spent.append(time.time() - t0)  # the epoch, its checkpoint included
        if p.time_budget_s and not resumed and state.epoch in (2, halfway) and state.epochs > state.epoch:
            replan(run, state, p, len(data.x_train), p.time_budget_s - (time.time() - start), float(np.mean(spent[1:])))
            if state.epoch == 2:
                halfway = state.epochs // 2  # once more, halfway through this plan

    elapsed = round(time.time() - start, 1)
    budget = ({"time_budget_s": p.time_budget_s, "planned_epochs": state.epochs,
               "planned_seconds": state.planned_seconds, "seconds": elapsed} if p.time_budget_s else {})
    result = TrainResult(state.epoch, state.best_epoch, state.best_map, state.stopped, **budget)
    if dist.is_initialized():
        log.info("rank %d/%d: final weights sha256 %s%s", dist.get_rank(), dist.get_world_size(),
                 state_digest(run.model.state_dict())[:16], " (writes the outputs)" if lead else "")
        dist.barrier()
        dist.destroy_process_group()
    if lead:
        save_model_file(layout.model, arch=p.model, head=p.head, labels=data.vocabulary, image_size=data.image_size,
                        state_dict=best_weights, tta=p.eval_augment, params=p.model_dump(mode="json"),
                        best_epoch=state.best_epoch, val_map=state.best_map)
        write_csv(layout.train_history, HISTORY_COLUMNS, ([h[c] for c in HISTORY_COLUMNS] for h in state.history))
        write_json(layout.train_summary, asdict(result))
        write_json(layout.run_log / "train.json", {"device": str(device), "start": source, "resumed_from_epoch": resumed,
                                                    "seconds": elapsed, "epoch_seconds": seconds})
        if store is not None:
            distributed.upload_outputs(store, layout)
    return result


def run(params: Params, layout: Layout) -> TrainResult | None:
    """The train stage as dvc.yaml runs it: training in this process; or, with train.devices > 1 or
    train.nodes > 1 (and not already started by torchrun), the launch multitag/distributed.py makes of
    this stage on several processes, nodes or Kubernetes pods."""
    if distributed.needs_launch(params.train):
        return distributed.launch(params, layout)
    registry = open_registry(params, layout.root) if params.lineage.init_from else None
    store = open_store(params.store.uri, layout.root) if params.train.nodes > 1 else None
    return train(params.train, layout, params.lineage.init_from, registry, store=store)
