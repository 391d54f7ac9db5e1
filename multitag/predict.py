"""Batch prediction over a folder of images with a registered model (or a model file)."""

from __future__ import annotations

import json
import logging
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from multitag.compute import executor, map_chunks
from multitag.config import ComputeParams
from multitag.dataset import select_device
from multitag.errors import NotFound, RecordError
from multitag.images import IMAGE_SUFFIXES, decode, read_bytes
from multitag.models import load_model_file, predict_scores
from multitag.progress import progress
from multitag.registry import Registry
from multitag.report import as_text_cell
from multitag.serving import OnnxModel, export_onnx
from multitag.storage import Store

log = logging.getLogger(__name__)

def _thresholds(path: str, labels: list[str]) -> np.ndarray:
    """A thresholds.json for these labels (as the evaluate stage writes it); any other is refused."""
    try:
        data = json.loads(Path(path).read_text())
        thresholds, their_labels = data["thresholds"], data.get("labels", labels)
    except FileNotFoundError:
        raise FileNotFoundError(f"thresholds file not found: {path}") from None
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path}: not a thresholds file (expected {{\"labels\": [...], \"thresholds\": [...]}})") from None
    if len(thresholds) != len(labels) or their_labels != labels:
        raise ValueError(f"{path}: {len(thresholds)} thresholds for labels {their_labels[:5]}...; the model has "
                         f"{len(labels)} labels {labels[:5]}...: use the thresholds.json of this model's run")
    return np.asarray(thresholds, dtype=np.float64)


class Predictor:
    """A model ready to score uint8 NHWC images: PyTorch (eager) or ONNX Runtime, with its labels,
    thresholds and input size."""

    def __init__(self, path: Path, engine: str, thresholds: np.ndarray | None, device):
        self.engine, self.device = engine, device
        if engine == "onnx":
            self.onnx = OnnxModel(path)
            self.labels, self.image_size, own = self.onnx.labels, self.onnx.image_size, self.onnx.thresholds
        else:
            self.net, meta = load_model_file(path, device)
            self.labels, self.image_size, self.tta, own = meta["labels"], meta["image_size"], meta["tta"], None
        self.thresholds = thresholds if thresholds is not None else (
            own if own is not None else np.full(len(self.labels), 0.5))

    def scores(self, images: np.ndarray) -> np.ndarray:
        if self.engine == "onnx":
            return self.onnx.probabilities(images)
        return predict_scores(self.net, images, self.device, tta=self.tta)


def open_model(model: str, registry: Registry, thresholds_file: str | None, engine: str, tmp: Path,
               device) -> tuple[Predictor, str, dict]:
    """(predictor, description, spec) for a registry reference (champion, 3, v3) or a model file (.pt;
    .onnx for the onnx engine). A version registered before ONNX export is exported on the fly. The
    spec names the same model for a Dask worker to load itself."""
    if engine not in ("torch", "onnx"):
        raise ValueError(f"--engine: unknown engine {engine!r}; choose torch or onnx")
    if Path(model).suffix in (".pt", ".pth", ".onnx") or "/" in model:
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {model}")
        if engine == "onnx" and path.suffix != ".onnx":
            path = export_onnx(path, tmp / "model.onnx")
        thresholds = None
        if thresholds_file:
            labels = OnnxModel(path).labels if path.suffix == ".onnx" else load_model_file(path)[1]["labels"]
            thresholds = _thresholds(thresholds_file, labels)
        predictor = Predictor(path, engine, thresholds, device)
        return predictor, model, {"file": str(path.resolve()), "engine": engine,
                                  "thresholds": predictor.thresholds.tolist()}
    version, card, path = _registered_file(registry, model, engine, tmp)
    thresholds = _thresholds(thresholds_file, card["labels"]) if thresholds_file else np.asarray(card["thresholds"])
    spec = {"store": registry.store.uri, "name": registry.name, "version": version, "engine": engine,
            "thresholds": thresholds.tolist()}
    return Predictor(path, engine, thresholds, device), f"{registry.name} v{version} ({engine})", spec


def _registered_file(registry: Registry, ref: str | int, engine: str, folder: Path) -> tuple[int, dict, Path]:
    """(version, card, path) of a registered version's file for ``engine`` (model.onnx or model.pt),
    downloaded into ``folder``; a version registered before ONNX export is exported here."""
    path = folder / ("model.onnx" if engine == "onnx" else "model.pt")
    try:
        version, card = registry.download_model(ref, path, path.name)
    except NotFound:
        if engine != "onnx":
            raise
        version, card = registry.download_model(ref, folder / "model.pt")
        export_onnx(folder / "model.pt", path, card["thresholds"])
    return version, card, path


class ImageSource:
    """The images under a local folder or an s3://bucket/prefix: ``names`` (paths relative to it) and
    ``read(name)`` (their bytes; a problem with one image is a RecordError)."""

    def __init__(self, source: str | Path, names: list[str] | None = None):
        """``names``: already listed (a Dask worker reading its share), else the source is listed."""
        self.source = str(source)
        if self.source.startswith("s3://"):
            from multitag.storage import S3Store
            self.store = S3Store(self.source)
            self.names = names if names is not None else [
                k for k in self.store.list() if Path(k).suffix.lower() in IMAGE_SUFFIXES]
        else:
            self.folder = Path(source).absolute()  # as the workers of a Dask cluster must find it
            self.source = str(self.folder)
            if not self.folder.is_dir():
                raise FileNotFoundError(f"image folder not found: {self.folder}")
            self.names = names if names is not None else sorted(
                p.relative_to(self.folder).as_posix() for p in self.folder.rglob("*")
                if p.is_file() and not p.is_symlink() and p.suffix.lower() in IMAGE_SUFFIXES)

    def read(self, name: str) -> bytes:
        if self.source.startswith("s3://"):
            try:
                data = self.store.get_bytes(name)[0]
            except NotFound:
                raise RecordError(f"image not found: {self.store.url(name)}") from None
            if not data:
                raise RecordError(f"empty (zero-byte) file: {self.store.url(name)}")
            return data
        return read_bytes(self.folder / name)


def decode_batch(source: ImageSource, names: list[str], size: int) -> tuple[list[str], list[np.ndarray], dict]:
    """(names decoded, their uint8 arrays, {name: error} for the rest)."""
    ok, arrays, errors = [], [], {}
    for name in names:
        try:
            arrays.append(decode(source.read(name), size, name))
            ok.append(name)
        except RecordError as err:
            errors[name] = str(err)
    return ok, arrays, errors


_PREDICTORS: dict[str, Predictor] = {}  # per process: a Dask worker loads the model once


def _worker_predictor(spec: dict) -> Predictor:
    """The predictor ``spec`` names, loaded in this process on first use: a model file the workers
    can read, or a registered version they download from the store themselves."""
    key = json.dumps(spec, sort_keys=True)
    if key not in _PREDICTORS:
        if spec.get("file"):
            path = Path(spec["file"])
        else:
            from multitag.storage import open_store
            registry = Registry(open_store(spec["store"]), spec["name"])
            path = _registered_file(registry, spec["version"], spec["engine"],
                                    Path(tempfile.mkdtemp(prefix="multitag-model-")))[2]
        _PREDICTORS[key] = Predictor(path, spec["engine"], np.asarray(spec["thresholds"]), select_device("auto"))
    return _PREDICTORS[key]


def _score_chunk(spec: dict, source: str, names: list[str]) -> tuple[list[str], np.ndarray, dict]:
    """Decode and score a chunk of images where it runs (this process or a Dask worker)."""
    predictor = _worker_predictor(spec)
    ok, arrays, errors = decode_batch(ImageSource(source, names), names, predictor.image_size)
    return ok, predictor.scores(np.stack(arrays)) if arrays else np.zeros((0, len(predictor.labels))), errors


def predict_folder(folder: str | Path, model: str, store: Store, registry_name: str, out: str | Path,
                   thresholds_file: str | None = None, batch_size: int = 256, engine: str = "torch",
                   compute: ComputeParams = ComputeParams()) -> dict:
    """Predict every image under ``folder`` (a folder or an s3://bucket/prefix) into ``out`` (.csv or
    .parquet, a path or an s3:// URI): image, predicted labels (space-separated, at the tuned
    thresholds), error, and one probability column per label. An unreadable image gets a row with
    its error, not a crash. With ``compute.dask``, chunks of images are decoded and scored on the
    cluster's workers, each loading the model itself (from the store, or a path they share)."""
    source = ImageSource(folder)
    with tempfile.TemporaryDirectory() as tmp:
        predictor, desc, spec = open_model(model, Registry(store, registry_name), thresholds_file, engine, Path(tmp),
                                           select_device("auto"))
        _PREDICTORS[json.dumps(spec, sort_keys=True)] = predictor  # this process has it already
        chunk = compute.chunk if compute.dask else batch_size
        rows, failed, first_error = [], 0, None
        with executor(compute, 1) as pool:
            chunks = map_chunks(partial(_score_chunk, spec, source.source), source.names, pool, chunk, compute)
            for names, probs, errors in progress(chunks, -(-len(source.names) // chunk), "predict",
                                                 f"chunks of {chunk} images", log):
                for name, p in zip(names, probs):
                    predicted = " ".join(label for label, pi, t in zip(predictor.labels, p, predictor.thresholds)
                                         if pi >= t)
                    rows.append([name, predicted, "", *p.round(5).tolist()])
                for name, error in errors.items():
                    rows.append([name, "", error, *[None] * len(predictor.labels)])
                    failed += 1
                    first_error = first_error or f"{name}: {error}"
        rows.sort(key=lambda r: r[0])
        written = write_table(rows, ["image", "labels", "error", *[f"p_{label}" for label in predictor.labels]], str(out),
                              Path(tmp))
    log.info("predicted %d images with %s -> %s (%d unreadable)", len(rows) - failed, desc, written, failed)
    if not rows:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    if failed == len(rows):
        raise ValueError(f"none of the {failed} image files in {folder} could be read (reasons per file in {written}); "
                         f"first: {first_error}")
    return {"images": len(rows), "predicted": len(rows) - failed, "failed": failed, "model": desc, "out": written}


def write_table(rows: list[list], columns: list[str], out: str, tmp: Path) -> str:
    """Write rows as CSV or Parquet (by the suffix of ``out``), locally or to s3://bucket/key."""
    suffix = Path(out).suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise ValueError(f"--out: {out} must end in .csv or .parquet")
    local = tmp / f"out{suffix}" if out.startswith("s3://") else Path(out)
    local.parent.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows, columns=columns)
    if suffix == ".csv":
        frame.map(as_text_cell).to_csv(local, index=False, float_format="%.5f")  # opened in spreadsheets
    else:
        frame.to_parquet(local, index=False)
    if out.startswith("s3://"):
        from multitag.storage import S3Store
        bucket, _, key = out.removeprefix("s3://").partition("/")
        S3Store(f"s3://{bucket}").put_file(key, local)
    return out
