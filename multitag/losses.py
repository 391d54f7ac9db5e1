"""Multi-label losses on logits (one sigmoid per label), each averaged over images and labels.

- ``bce``: binary cross-entropy, optionally weighting positives by negatives/positives per label.
- ``focal``: Lin et al. 2017, BCE scaled by (1 - p_t)^gamma, so easy examples count less.
- ``asl``: asymmetric loss, Ridnik et al. 2021: separate focusing for positives (gamma_pos) and
  negatives (gamma_neg), and negatives' probabilities shifted down by ``clip`` (p_m = max(p - clip, 0)),
  which discards very easy negatives and down-weights possibly mislabelled ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from multitag.config import TrainParams


def pos_weight_for(y: torch.Tensor) -> torch.Tensor:
    """negatives/positives per label, capped so a nearly absent label cannot dominate the loss."""
    pos = y.sum(0)
    return ((len(y) - pos) / pos.clamp(min=1)).clamp(1.0, 100.0)


class FocalLoss(nn.Module):
    def __init__(self, gamma: float = 2.0, pos_weight: torch.Tensor | None = None):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        bce = F.binary_cross_entropy_with_logits(logits, y, pos_weight=self.pos_weight, reduction="none")
        p = torch.sigmoid(logits)
        p_t = y * p + (1 - y) * (1 - p)
        return ((1 - p_t) ** self.gamma * bce).mean()


class AsymmetricLoss(nn.Module):
    def __init__(self, gamma_pos: float = 0.0, gamma_neg: float = 4.0, clip: float = 0.05, eps: float = 1e-8):
        super().__init__()
        self.gamma_pos, self.gamma_neg, self.clip, self.eps = gamma_pos, gamma_neg, clip, eps

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(logits)
        p_neg = (p - self.clip).clamp(min=0) if self.clip > 0 else p  # shifted probability for negatives
        loss_pos = y * (1 - p) ** self.gamma_pos * torch.log(p.clamp(min=self.eps))
        loss_neg = (1 - y) * p_neg ** self.gamma_neg * torch.log((1 - p_neg).clamp(min=self.eps))
        return -(loss_pos + loss_neg).mean()


def make_loss(p: TrainParams, y_train: torch.Tensor) -> nn.Module:
    """The loss of ``train.loss``; ``train.pos_weight`` applies to bce and focal."""
    weight = pos_weight_for(y_train) if p.pos_weight else None
    if p.loss == "focal":
        return FocalLoss(p.focal_gamma, weight)
    if p.loss == "asl":
        return AsymmetricLoss(p.asl_gamma_pos, p.asl_gamma_neg, p.asl_clip)
    return nn.BCEWithLogitsLoss(pos_weight=weight)


class ModelEma:
    """Exponential moving average of a model's weights (float tensors averaged, integer buffers such
    as BatchNorm's step count copied). The decay ramps up as (1 + n) / (10 + n) over the first
    updates, so early, poor weights fade quickly."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.state[k].lerp_(v.detach(), 1 - d)
            else:
                self.state[k].copy_(v)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "state": self.state}

    def load_state_dict(self, saved: dict) -> None:
        self.decay, self.updates = saved["decay"], saved["updates"]
        self.state = {k: v.clone() for k, v in saved["state"].items()}
