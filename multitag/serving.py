"""Models for serving stacks: ONNX export of a model file and prediction with ONNX Runtime.

The exported graph takes ``images``: float32, (batch, 3, H, W), RGB scaled to [0, 1] and resized to
the model's ``image_size`` (what multitag/images.py's ``decode`` gives, divided by 255), with a
dynamic batch axis; and returns ``probabilities``: float32, (batch, labels), sigmoid applied (and
the mirror-image average when the model was trained with ``eval_augment: hflip``). The label
vocabulary, the tuned thresholds and the input size travel in the ONNX metadata (``labels``,
``thresholds``: JSON lists; ``image_size``; ``input``), so a serving stack needs nothing else.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from multitag.models import load_model_file

log = logging.getLogger(__name__)

INPUT, OUTPUT = "images", "probabilities"
INPUT_DOC = "float32 (batch, 3, H, W) RGB in [0, 1], resized to image_size x image_size"


class Probabilities(nn.Module):
    """A model's logits as probabilities, with its test-time augmentation."""

    def __init__(self, model: nn.Module, tta: str = "none"):
        super().__init__()
        self.model, self.hflip = model, tta == "hflip"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        probs = torch.sigmoid(self.model(images))
        if self.hflip:
            probs = (probs + torch.sigmoid(self.model(images.flip(3)))) / 2
        return probs


def export_onnx(model_file: str | Path, out: str | Path, thresholds: list[float] | None = None) -> Path:
    """Write ``out`` (model.onnx) from a multitag model file, check it with onnx.checker and return it."""
    import onnx

    model, meta = load_model_file(model_file)
    labels, size = meta["labels"], meta["image_size"]
    thresholds = list(thresholds) if thresholds is not None else [0.5] * len(labels)
    if len(thresholds) != len(labels):
        raise ValueError(f"{len(thresholds)} thresholds for {len(labels)} labels")
    wrapped = Probabilities(model, meta["tta"]).eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # the TorchScript exporter: 0.3 s a model here against 9 s for the torch.export-based one
        # (bench/RESULTS.md); torch is pinned, and tests/test_serving.py checks the graph against PyTorch
        warnings.simplefilter("ignore")  # its deprecation notice, and the tracer's notes on shape checks
        torch.onnx.export(wrapped, (torch.rand(2, 3, size, size),), buffer, input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, dynamo=False)
    proto = onnx.load_from_string(buffer.getvalue())
    for key, value in {"labels": json.dumps(labels), "thresholds": json.dumps([float(t) for t in thresholds]),
                       "image_size": str(size), "input": INPUT_DOC, "arch": meta["arch"],
                       "head": meta.get("head", "linear"), "producer": "multitag"}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(out))
    onnx.checker.check_model(str(out))
    log.info("exported %s to %s (%d labels, %d px, dynamic batch)", model_file, out, len(labels), size)
    return out


class OnnxModel:
    """An exported model run by ONNX Runtime: ``labels``, ``thresholds``, ``image_size`` from its
    metadata; ``probabilities(uint8 NHWC images)``."""

    def __init__(self, path: str | Path):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("producer") != "multitag":
            raise ValueError(f"{path}: not an ONNX model exported by multitag (no labels in its metadata)")
        self.labels, self.thresholds = json.loads(meta["labels"]), np.asarray(json.loads(meta["thresholds"]))
        self.image_size = int(meta["image_size"])

    def probabilities(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        images = np.asarray(images)
        out = [self.session.run([OUTPUT], {INPUT: np.ascontiguousarray(
            images[i:i + batch_size].transpose(0, 3, 1, 2), dtype=np.float32) / 255})[0]
            for i in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)), np.float32)
