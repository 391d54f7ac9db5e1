"""Models for serving stacks: every registered version carries model.onnx, `multitag export` writes
older ones, and ONNX Runtime gives the probabilities PyTorch gives."""

import json

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from multitag.models import build_model, load_model_file, predict_scores, save_model_file
from multitag.predict import predict_folder
from multitag.registry import Registry
from multitag.report import read_csv_rows
from multitag.serving import OnnxModel, export_onnx
from multitag.storage import LocalStore


@pytest.mark.parametrize("arch, head, tta", [("compact_cnn", "linear", "none"), ("compact_cnn", "mldecoder", "hflip")])
def test_onnx_export_agrees_with_pytorch(tmp_path, arch, head, tta):
    torch.manual_seed(0)
    model = build_model(arch, 5, 24, head=head)
    with torch.no_grad():  # a model that is not at its initialisation: BatchNorm statistics moved
        model.train()(torch.rand(16, 3, 24, 24))
    save_model_file(tmp_path / "m.pt", arch=arch, head=head, labels=list("abcde"), image_size=24,
                    state_dict=model.state_dict(), tta=tta)
    path = export_onnx(tmp_path / "m.pt", tmp_path / "m.onnx", [0.1, 0.2, 0.3, 0.4, 0.5])
    onnx.checker.check_model(str(path))
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta["labels"]) == list("abcde") and json.loads(meta["thresholds"])[4] == 0.5
    images = np.random.default_rng(1).integers(0, 256, (300, 24, 24, 3), dtype=np.uint8)  # batch 300 from a batch-2 export
    net, _ = load_model_file(tmp_path / "m.pt")
    eager = predict_scores(net, images, torch.device("cpu"), tta=tta)
    runtime = OnnxModel(path).probabilities(images)
    assert runtime.shape == (300, 5) and np.abs(runtime - eager).max() < 1e-4


def test_predict_with_the_onnx_engine_from_the_registry(tmp_path):
    torch.manual_seed(0)
    save_model_file(tmp_path / "m.pt", arch="compact_cnn", labels=["a", "b"], image_size=16,
                    state_dict=build_model("compact_cnn", 2, 16).state_dict())
    registry = Registry(LocalStore(tmp_path / "store"), "m")
    files = {"model.pt": tmp_path / "m.pt", "model.onnx": export_onnx(tmp_path / "m.pt", tmp_path / "m.onnx", [0.4, 0.6])}
    card = {"labels": ["a", "b"], "thresholds": [0.4, 0.6], "test_set": "T", "metrics": {"test": {"map": 0.5}},
            "params": {"train": {"model": "compact_cnn"}}, "git": {}}
    registry.register(files, card)
    old = registry.register({"model.pt": _other(tmp_path)}, {**card, "metrics": {"test": {"map": 0.4}}})  # no model.onnx
    (tmp_path / "imgs").mkdir()
    for i in range(5):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    runs = {}
    for engine, ref in (("torch", "champion"), ("onnx", "champion"), ("onnx", str(old.version))):
        out = tmp_path / f"{engine}-{ref}.csv"
        result = predict_folder(tmp_path / "imgs", ref, registry.store, "m", out, engine=engine)
        assert result["predicted"] == 5 and f"({engine})" in result["model"]
        runs[engine, ref] = read_csv_rows(out)
    for a, b in zip(runs["torch", "champion"], runs["onnx", "champion"]):
        assert a["labels"] == b["labels"] and abs(float(a["p_a"]) - float(b["p_a"])) < 1e-4


def _other(tmp_path):
    torch.manual_seed(1)
    save_model_file(tmp_path / "old.pt", arch="compact_cnn", labels=["a", "b"], image_size=16,
                    state_dict=build_model("compact_cnn", 2, 16).state_dict())
    return tmp_path / "old.pt"
