"""How the stages with a model read the prepared data: a split's images and targets from the uint8
shards (in memory, or batch by batch from memory-mapped shards), and the device that computes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from multitag.layout import Layout, read_manifest


def select_device(preference: str = "auto") -> torch.device:
    """``auto``: the GPU when CUDA is available, else the CPU; ``cuda`` fails clearly without one."""
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
        idx = np.asarray(idx)
        out = np.empty((len(idx), *self.shape[1:]), np.uint8)
        for shard in np.unique(self.shard[idx]):
            here = self.shard[idx] == shard
            out[here] = self._map(int(shard))[self.offset[idx[here]]]
        return torch.from_numpy(out)


def load_split(layout: Layout, split: str | None, targets: bool = True, in_memory: bool = True):
    """(images uint8 NHWC, float targets or None, manifest rows) of one split (None: every image),
    read from the shards (``in_memory=False``: a ShardSplit that reads each batch from them when asked)."""
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
