"""Where everything is: the workspace's files, which stage writes which, the manifest's schema, how
a split is read back from the shards, and which device computes.

Every stage, flow, the registry and the tests take their paths from here; ``tests/test_layout.py``
checks that dvc.yaml declares exactly ``STAGE_OUTPUTS`` and that each stage's code ``deps`` are the
modules it imports.
"""

from __future__ import annotations

from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    import torch

PARAMS = "params.yaml"
LINEAGE = "lineage.yaml"          # machine-written state of the data lineage (multitag/lineage.py)

# Stage outputs, relative to the workspace.
SAMPLE = "data/sample"            # the default of sample.out
PREPARED = "data/prepared"        # ingest: uint8 shards + manifest
MANIFEST = "manifest.parquet"     # inside PREPARED
SHARDS = "shards"                 # inside PREPARED: 00000.npy, 00001.npy, ...
LABELS = "data/labels"            # labels: vocabulary + multi-hot targets
VOCABULARY = "vocabulary.json"    # inside LABELS
TARGETS = "targets.npy"           # inside LABELS, rows aligned with the manifest
MODEL = "models/model.pt"         # train
INGEST_SUMMARY = "reports/ingest.json"
INGEST_ISSUES = "reports/ingest_issues.csv"
LABELS_SUMMARY = "reports/labels.json"
LABEL_STATS = "reports/label_stats.json"
LABEL_STATS_PLOT = "reports/plots/label_stats.png"
TRAIN_SUMMARY = "reports/train.json"
TRAIN_HISTORY = "reports/train_history.csv"
METRICS = "reports/metrics.json"
THRESHOLDS = "reports/thresholds.json"
PER_LABEL = "reports/per_label.csv"
PR_CURVES = "reports/plots/pr"    # one CSV per label (DVC plots)
PR_PLOT = "reports/plots/pr_curves.png"
REGISTRATION = "reports/registration.json"
LABEL_ISSUES = "reports/label_issues.csv"       # review
LABEL_ISSUES_PLOT = "reports/plots/label_issues.png"
REVIEW_SUMMARY = "reports/review.json"

# Not outputs: state a workspace keeps between runs, never versioned (git- and DVC-ignored).
SCRATCH = ".multitag"
CHECKPOINT = ".multitag/checkpoints/last.pt"   # a killed training run resumes from here
DECODE_CACHE = ".multitag/decode-cache"        # decoded images by content hash: re-ingest skips them
RUN_LOG = ".multitag/runs"                     # per-stage timings of the latest run (vary run to run)

# What each dvc.yaml stage writes, as dvc.yaml declares it (checked by tests/test_layout.py).
STAGE_OUTPUTS: dict[str, dict[str, list[str]]] = {
    "sample": {"outs": ["${sample.out}"]},
    "ingest": {"outs": [PREPARED, INGEST_SUMMARY, INGEST_ISSUES]},
    "labels": {"outs": [LABELS, LABELS_SUMMARY, LABEL_STATS, LABEL_STATS_PLOT]},
    "train": {"outs": [MODEL, TRAIN_SUMMARY, TRAIN_HISTORY]},
    "evaluate": {"outs": [THRESHOLDS, PER_LABEL, PR_CURVES, PR_PLOT], "metrics": [METRICS]},
    "register": {"outs": [REGISTRATION]},
    "review": {"outs": [LABEL_ISSUES, LABEL_ISSUES_PLOT], "metrics": [REVIEW_SUMMARY]},
}
# The module holding each stage's function (its code deps are what this module imports).
STAGE_MODULES = {"sample": "multitag.sample_data", "ingest": "multitag.ingest", "labels": "multitag.labels",
                 "train": "multitag.train", "evaluate": "multitag.evaluate", "register": "multitag.champion",
                 "review": "multitag.review"}
# What `multitag run` and `dvc repro` run, in order. The sample stage runs even when ingest reads other
# data (a few seconds): one graph, so that `git clone` + `dvc pull` restores every stage's outputs.
PIPELINE = ["sample", "ingest", "labels", "train", "evaluate", "register", "review"]

# manifest.parquet: one row per accepted image, sorted by sha256; row i <-> targets.npy row i.
MANIFEST_COLUMNS = {
    "id": "str",          # first 16 hex digits of sha256
    "source": "str",      # the image path as the annotations wrote it
    "sha256": "str",      # content hash of the image file
    "split": "str",       # train | val | test, from the content hash
    "tags": "list[str]",  # the image's labels, sorted
    "shard": "int64",     # shard file number
    "offset": "int64",    # row inside the shard
}


def split_for(digest: str, val_fraction: float, test_fraction: float) -> str:
    """train/val/test from the content hash alone, so adding images never moves an old one."""
    u = int(digest[:16], 16) / 2**64
    if u < test_fraction:
        return "test"
    return "val" if u < test_fraction + val_fraction else "train"


class Layout:
    """The paths of one workspace (``root``): ``Layout(ws).prepared``, ``.model``, ``.metrics`` ..."""

    def __init__(self, root: str | Path = "."):
        self.root = Path(root)
        r = self.root
        self.params, self.lineage = r / PARAMS, r / LINEAGE
        self.prepared, self.labels = r / PREPARED, r / LABELS
        self.manifest, self.shards = self.prepared / MANIFEST, self.prepared / SHARDS
        self.vocabulary, self.targets = self.labels / VOCABULARY, self.labels / TARGETS
        self.model = r / MODEL
        self.ingest_summary, self.ingest_issues = r / INGEST_SUMMARY, r / INGEST_ISSUES
        self.labels_summary, self.label_stats, self.label_stats_plot = (
            r / LABELS_SUMMARY, r / LABEL_STATS, r / LABEL_STATS_PLOT)
        self.train_summary, self.train_history = r / TRAIN_SUMMARY, r / TRAIN_HISTORY
        self.metrics, self.thresholds, self.per_label = r / METRICS, r / THRESHOLDS, r / PER_LABEL
        self.pr_curves, self.pr_plot = r / PR_CURVES, r / PR_PLOT
        self.registration = r / REGISTRATION
        self.label_issues, self.label_issues_plot, self.review_summary = (
            r / LABEL_ISSUES, r / LABEL_ISSUES_PLOT, r / REVIEW_SUMMARY)
        self.checkpoint, self.decode_cache, self.run_log = r / CHECKPOINT, r / DECODE_CACHE, r / RUN_LOG

    def shard(self, number: int) -> Path:
        return self.shards / f"{number:05d}.npy"


def read_manifest(layout: Layout, columns: list[str] | None = None) -> pd.DataFrame:
    return pd.read_parquet(layout.manifest, columns=columns)


def select_device(preference: str = "auto") -> torch.device:
    """``auto``: the GPU when CUDA is available, else the CPU; ``cuda`` fails clearly without one."""
    import torch  # here, not at the top: the stages without a model start without torch
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available (use 'auto' or 'cpu')")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


class ShardSplit:
    """One split's images, gathered per batch straight from the memory-mapped uint8 shards (the
    ``train.workers > 0`` path, for splits larger than memory): ``split[idx]`` is a uint8 NHWC tensor."""

    def __init__(self, layout: Layout, rows: pd.DataFrame):
        self.layout, self.shard, self.offset = layout, rows["shard"].to_numpy(), rows["offset"].to_numpy()
        self._maps: dict[int, np.ndarray] = {}
        first = self._map(int(self.shard[0])) if len(self.shard) else np.zeros((0, 1, 1, 3), np.uint8)
        self.shape = (len(self.shard), *first.shape[1:])

    def _map(self, shard: int) -> np.ndarray:
        if shard not in self._maps:
            self._maps[shard] = np.load(self.layout.shard(shard), mmap_mode="r")
        return self._maps[shard]

    def __getstate__(self) -> dict:  # sent to worker processes: each maps the shards itself
        return {**self.__dict__, "_maps": {}}

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> torch.Tensor:
        import torch
        idx = np.asarray(idx)
        out = np.empty((len(idx), *self.shape[1:]), np.uint8)
        for shard in np.unique(self.shard[idx]):
            here = self.shard[idx] == shard
            out[here] = self._map(int(shard))[self.offset[idx[here]]]
        return torch.from_numpy(out)


def load_split(layout: Layout, split: str | None, targets: bool = True, in_memory: bool = True):
    """(images uint8 NHWC, float targets or None, manifest rows) of one split (None: every image),
    read from the shards (``in_memory=False``: a ShardSplit that reads each batch from them when asked)."""
    import torch
    manifest = read_manifest(layout)
    rows = manifest.index[(manifest["split"] == split) if split else slice(None)].to_numpy()
    y = torch.from_numpy(np.load(layout.targets)[rows].astype(np.float32)) if targets else None
    if not in_memory:
        return ShardSplit(layout, manifest.loc[rows]), y, manifest.loc[rows]
    parts = []
    for shard, group in manifest.loc[rows].groupby("shard", sort=True):
        arr = np.load(layout.shard(int(shard)), mmap_mode="r")
        parts.append(np.asarray(arr[group["offset"].to_numpy()]))
    images = np.concatenate(parts) if parts else np.zeros((0, 1, 1, 3), np.uint8)
    # groupby(sort=True) walks shards in order and rows are sorted within each shard, so
    # ``images`` follows ``rows`` (manifest order); targets are indexed the same way.
    return torch.from_numpy(images), y, manifest.loc[rows]
