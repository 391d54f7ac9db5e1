"""Model construction, the self-describing model file, and batched scoring.

Models take uint8-valued images scaled to [0, 1] (NCHW float) and normalise inside, so the
pixels stored in shards and decoded at prediction time are all a model needs.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import pickle
import tempfile
import urllib.error
import urllib.parse
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


class GlobalMaxPool(nn.Module):
    """Max over the spatial axes, (B, C, H, W) -> (B, C, 1, 1): nn.AdaptiveMaxPool2d(1) written as a
    reduction, which every ONNX exporter translates (torch 2.11's could not translate adaptive_max_pool2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=(2, 3), keepdim=True)


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
            GlobalMaxPool(), nn.Flatten())
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(4 * w, num_labels))

    def forward(self, x):
        return self.classifier(self.features(x))


class MLDecoder(nn.Module):
    """ML-Decoder (Ridnik et al. 2023, "ML-Decoder: Scalable and Versatile Classification Head"):
    learned label queries attend over the backbone's spatial features in one decoder layer without
    self-attention; with more labels than ``groups``, each query answers for a group of labels through
    its own small projection ("group decoding"), so the cost stays flat as labels grow."""

    def __init__(self, channels: int, num_labels: int, dim: int = 256, heads: int = 8, groups: int = 100,
                 ff: int = 1024, dropout: float = 0.1):
        super().__init__()
        self.num_labels = num_labels
        k = min(groups, num_labels)
        self.per_group = math.ceil(num_labels / k)
        self.embed = nn.Linear(channels, dim)
        self.queries = nn.Parameter(torch.randn(k, dim) * 0.02)
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(ff, dim))
        self.group_weight = nn.Parameter(torch.empty(k, dim, self.per_group))
        nn.init.xavier_uniform_(self.group_weight)
        self.group_bias = nn.Parameter(torch.zeros(num_labels))

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, labels)
        tokens = torch.relu(self.embed(features.flatten(2).transpose(1, 2)))
        q = self.queries.unsqueeze(0).expand(features.shape[0], -1, -1)
        h = self.norm1(q + self.attention(q, tokens, tokens, need_weights=False)[0])
        h = self.norm2(h + self.ff(h))
        logits = torch.einsum("bkd,kdg->bkg", h, self.group_weight).flatten(1)[:, :self.num_labels]
        return logits + self.group_bias


class DecoderNet(nn.Module):
    """A backbone's spatial features, then an ML-Decoder head (train.head: mldecoder)."""

    def __init__(self, features: nn.Module, channels: int, num_labels: int):
        super().__init__()
        self.features, self.decoder = features, MLDecoder(channels, num_labels)

    def forward(self, x):
        return self.decoder(self.features(x))


def spatial_features(name: str, backbone: nn.Module, image_size: int) -> tuple[nn.Module, int]:
    """The part of a backbone that keeps a spatial map (before global pooling), and its channels."""
    if name == "compact_cnn":
        features = backbone.features[:-2]
    elif hasattr(backbone, "layer4") and hasattr(backbone, "fc"):  # ResNet, ResNeXt, Wide ResNet
        features = nn.Sequential(*list(backbone.children())[:-2])
    elif isinstance(getattr(backbone, "features", None), nn.Module):  # EfficientNet, MobileNet, ConvNeXt, ...
        features = backbone.features
    else:
        features = None
    with torch.no_grad():
        shape = features.eval()(torch.zeros(1, 3, image_size, image_size)).shape if features is not None else ()
    if len(shape) != 4:
        raise ValueError(f"train.head: mldecoder needs a backbone with spatial features, and {name} has none "
                         "usable; use head: linear, or compact_cnn, a ResNet, EfficientNet, MobileNet or ConvNeXt")
    return features.train(), shape[1]


class MultiLabelNet(nn.Module):
    """Normalisation (the pretrained weights' own, ImageNet's by default) + a network producing one
    logit per label (sigmoid applied by the loss/scorer)."""

    def __init__(self, backbone: nn.Module, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.backbone = backbone

    def forward(self, x):
        return self.backbone((x - self.mean) / self.std)


def available_models() -> list[str]:
    import torchvision
    return [*LOCAL_MODELS, *torchvision.models.list_models(module=torchvision.models)]


def _weights_by_name(name: str, spec: str):
    """(state dict, mean, std) of torchvision weights named ``spec`` for model ``name``, through
    torchvision's weights API and the torch hub cache (downloaded there when online)."""
    import torchvision
    try:
        weights = torchvision.models.get_weight(spec)
    except (ValueError, KeyError, AttributeError):
        raise ValueError(f"train.pretrained: {spec!r} is neither a local file nor a torchvision weights name "
                         "(such as ResNet18_Weights.IMAGENET1K_V1)") from None
    try:
        valid = [str(w) for w in torchvision.models.get_model_weights(name)]
    except (ValueError, KeyError):
        valid = []
    if str(weights) not in valid:
        raise ValueError(f"train.pretrained: {spec} are not weights of train.model {name}; its own are "
                         f"{valid or 'none (train.model is not a torchvision model)'}")
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlparse(weights.url).path).name
    try:
        state = weights.get_state_dict(progress=False)  # the cached file if there, else a download
    except (urllib.error.URLError, OSError) as err:
        raise FileNotFoundError(f"train.pretrained: {spec} is not in the torch hub cache ({cache}) and could not "
                                f"be downloaded ({getattr(err, 'reason', err)}); on a machine without internet, "
                                f"copy the file to {cache} (or set TORCH_HOME)") from None
    transforms = weights.transforms()
    return state, tuple(transforms.mean), tuple(transforms.std)


def _load_pretrained(backbone: nn.Module, spec: str, name: str) -> tuple[tuple, tuple]:
    """Load pretrained weights into ``backbone``: a local state_dict file, or torchvision weights by
    name; tensors whose shape differs (the replaced head) are skipped. Returns the normalisation the
    weights expect (ImageNet's for a file)."""
    file = Path(spec)
    if file.is_file():
        state, mean, std = torch.load(file, map_location="cpu", weights_only=True), IMAGENET_MEAN, IMAGENET_STD
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    elif "_Weights." in spec or spec.endswith("_Weights.DEFAULT"):
        state, mean, std = _weights_by_name(name, spec)
    else:
        raise FileNotFoundError(f"train.pretrained: weights file not found: {file} (give a local .pth file or a "
                                "torchvision weights name such as ResNet18_Weights.IMAGENET1K_V1)")
    own = backbone.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ValueError(f"train.pretrained: no tensor in {file} matches the model's layers; "
                         "is it the same architecture as train.model?")
    backbone.load_state_dict(usable, strict=False)
    log.info("loaded %d/%d tensors from %s (the rest, e.g. the label head, start fresh)", len(usable), len(own), spec)
    return mean, std


def build_model(name: str, num_labels: int, image_size: int, pretrained: str | None = None,
                head: str = "linear") -> MultiLabelNet:
    """A torchvision classification model (or one of LOCAL_MODELS) with ``num_labels`` outputs: its own
    linear head, or an ML-Decoder over its spatial features (``head="mldecoder"``)."""
    if name == "simple_cnn":
        backbone = SimpleCNN(num_labels, image_size)
    elif name == "compact_cnn":
        backbone = CompactCNN(num_labels)
    else:
        import torchvision
        if name not in torchvision.models.list_models(module=torchvision.models):
            raise ValueError(f"train.model: unknown model {name!r}; choose one of {available_models()}")
        backbone = torchvision.models.get_model(name, weights=None, num_classes=num_labels)
    mean, std = _load_pretrained(backbone, pretrained, name) if pretrained else (IMAGENET_MEAN, IMAGENET_STD)
    if head == "mldecoder":
        backbone = DecoderNet(*spatial_features(name, backbone, image_size), num_labels)
    elif head != "linear":
        raise ValueError(f"train.head: unknown head {head!r}; choose linear or mldecoder")
    return MultiLabelNet(backbone, mean, std)


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
    model = build_model(meta["arch"], len(meta["labels"]), meta["image_size"], head=meta.get("head", "linear"))
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
