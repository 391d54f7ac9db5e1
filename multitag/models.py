"""Model construction, the self-describing model file, and batched scoring.

Models take uint8-valued images scaled to [0, 1] (NCHW float) and normalise inside, so the
pixels stored in shards and decoded at prediction time are all a model needs.
"""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from multitag.config import LOCAL_MODELS
from multitag.report import write_atomic

log = logging.getLogger(__name__)

MODEL_FORMAT = "multitag-model/1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SimpleCNN(nn.Module):
    """The seed tutorials' Keras-style network: Conv32 -> Conv64 -> MaxPool -> Dense128 -> Dense."""

    def __init__(self, num_labels: int, image_size: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2), nn.Dropout(0.25), nn.Flatten())
        self.classifier = nn.Sequential(
            nn.Linear(64 * (image_size // 2) ** 2, 128), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(128, num_labels))

    def forward(self, x):
        return self.classifier(self.features(x))


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class CompactCNN(nn.Module):
    """A small all-convolutional network for low-resolution images (<= 64 px): it keeps spatial
    detail where ImageNet backbones downsample 32x (a 32 px image becomes 1x1 in resnet18), and
    its global max pooling asks "is this label anywhere in the image", which suits multi-label
    presence. On 2 CPU cores it trains about 5x faster than resnet18 at 32 px."""

    def __init__(self, num_labels: int, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_conv_bn(3, w), *_conv_bn(w, w), nn.MaxPool2d(2),
            *_conv_bn(w, 2 * w), *_conv_bn(2 * w, 2 * w), nn.MaxPool2d(2),
            *_conv_bn(2 * w, 4 * w), *_conv_bn(4 * w, 4 * w),
            nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(4 * w, num_labels))

    def forward(self, x):
        return self.classifier(self.features(x))


class MultiLabelNet(nn.Module):
    """Normalisation + backbone producing one logit per label (sigmoid applied by the loss/scorer)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.backbone = backbone

    def forward(self, x):
        return self.backbone((x - self.mean) / self.std)


def available_models() -> list[str]:
    import torchvision
    return [*LOCAL_MODELS, *torchvision.models.list_models(module=torchvision.models)]


def _load_pretrained(backbone: nn.Module, path: str) -> None:
    """Load a local state_dict, skipping tensors whose shape differs (the replaced head)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"train.pretrained: weights file not found: {file} "
                                "(weights are never downloaded; give a local .pth file)")
    state = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    own = backbone.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ValueError(f"train.pretrained: no tensor in {file} matches the model's layers; "
                         "is it the same architecture as train.model?")
    backbone.load_state_dict(usable, strict=False)
    log.info("loaded %d/%d tensors from %s (the rest, e.g. the label head, start fresh)",
             len(usable), len(own), file)


def build_model(name: str, num_labels: int, image_size: int, pretrained: str | None = None) -> MultiLabelNet:
    """A torchvision classification model (or one of LOCAL_MODELS) with ``num_labels`` outputs."""
    if name == "simple_cnn":
        backbone = SimpleCNN(num_labels, image_size)
    elif name == "compact_cnn":
        backbone = CompactCNN(num_labels)
    else:
        import torchvision
        if name not in torchvision.models.list_models(module=torchvision.models):
            raise ValueError(f"train.model: unknown model {name!r}; choose one of {available_models()}")
        backbone = torchvision.models.get_model(name, weights=None, num_classes=num_labels)
    if pretrained:
        _load_pretrained(backbone, pretrained)
    return MultiLabelNet(backbone)


def save_model_file(path: str | Path, *, arch: str, labels: list[str], image_size: int,
                    state_dict: dict, **meta) -> None:
    """Write a self-describing model file atomically: architecture, labels, input size, test-time
    augmentation (``tta``) and weights, with any further metadata."""
    save_atomic({"format": MODEL_FORMAT, "arch": arch, "labels": list(labels), "image_size": image_size,
                 "state_dict": state_dict, **meta}, path)


def save_atomic(obj, path: str | Path) -> None:
    """torch.save, written whole or not at all."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomic(path, buffer.getvalue())


def state_digest(state: dict) -> str:
    """sha256 over a state dict's names and tensors (independent of how it was saved)."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def load_model_file(path: str | Path, device: torch.device | str = "cpu") -> tuple[MultiLabelNet, dict]:
    """(model in eval mode, metadata) from a file written by save_model_file; no pickle code runs."""
    try:
        meta = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path}: refused: loading it would run pickled code (a full pickle, not a multitag "
                         "model file); only files of weights and plain metadata are loaded") from None
    except (RuntimeError, EOFError, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise FileNotFoundError(f"model file not found: {path}") from None
        raise ValueError(f"{path}: not a readable model file ({str(err).splitlines()[0][:200]})") from None
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path}: not a multitag model file")
    model = build_model(meta["arch"], len(meta["labels"]), meta["image_size"])
    model.load_state_dict(meta.pop("state_dict"))
    meta.setdefault("tta", meta.get("params", {}).get("eval_augment", "none"))  # files from before "tta"
    return model.to(device).eval(), meta


def to_input(batch_uint8_nhwc: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 NHWC (as stored in shards) -> float NCHW in [0, 1] on ``device``."""
    x = batch_uint8_nhwc.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


@torch.no_grad()
def predict_scores(model: nn.Module, images: np.ndarray | torch.Tensor, device: torch.device,
                   tta: str = "none", batch_size: int = 256) -> np.ndarray:
    """Sigmoid probabilities (images, labels) for uint8 NHWC images; with ``tta="hflip"`` the mean
    over each image and its mirror (train.eval_augment)."""
    images = torch.as_tensor(images)
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = to_input(images[start:start + batch_size], device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            probs = torch.sigmoid(model(x).float())
            if tta == "hflip":
                probs = (probs + torch.sigmoid(model(x.flip(3)).float())) / 2
        out.append(probs.cpu())
    n_labels = out[0].shape[1] if out else 0
    return torch.cat(out).numpy() if out else np.zeros((0, n_labels), dtype=np.float32)


def weights_digest(model_file: str | Path) -> str:
    """sha256 over the tensors of a model file (the same weights give the same digest, whatever the
    file's other contents)."""
    return state_digest(torch.load(model_file, map_location="cpu", weights_only=True)["state_dict"])


def load_registered(registry, version: int, device: torch.device | str = "cpu") -> tuple[MultiLabelNet, dict]:
    """(model, metadata) of a registered version, its checksum verified (for re-scoring a champion
    and for fine-tuning from a version)."""
    with tempfile.TemporaryDirectory() as tmp:
        registry.download_model(version, Path(tmp) / "model.pt")
        return load_model_file(Path(tmp) / "model.pt", device)
