"""Augmentation on whole batches as tensors (train.augment): one affine resampling for random resized
crop, rotation and flips, then colour jitter and cutout, each image with its own random draw; mixup
(which needs the targets) in train_step. Nothing is decoded during training, so this is the only
per-batch image work."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from multitag.config import AugmentParams


def augment(x: torch.Tensor, aug: AugmentParams, gen: torch.Generator) -> torch.Tensor:
    """Augment a whole batch (float NCHW in [0, 1]) at once: random resized crop, rotation and flips
    as one affine resampling, then colour jitter and cutout, each image with its own random draw."""
    n = x.shape[0]
    if aug.random_resized_crop or aug.hflip or aug.vflip or aug.rotation:
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
        cos, sin = torch.ones(n), torch.zeros(n)
        if aug.rotation:
            angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(aug.rotation)
            cos, sin = torch.cos(angle), torch.sin(angle)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = sx * cos, -sy * sin, tx
        theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = sx * sin, sy * cos, ty
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


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend each image and its targets with those of another image of the batch, by one weight drawn
    from Beta(alpha, alpha) per batch (mixup; soft multi-hot targets for the BCE-family losses). The
    partners come from ``gen``, the weight from torch's global generator (both in the checkpoint)."""
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    partner = torch.randperm(x.shape[0], generator=gen).to(x.device)
    return lam * x + (1 - lam) * x[partner], lam * y + (1 - lam) * y[partner]
