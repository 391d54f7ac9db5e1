"""params.yaml -> typed, validated configuration objects.

Unknown keys are rejected (a typo in params.yaml must not silently fall back to a default) and every
error names the offending key, e.g. ``train.lrr: unknown key``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PARAMS_FILE = "params.yaml"
STORE_URI_ENV = "MULTITAG_STORE_URI"


class ConfigError(ValueError):
    """params.yaml is missing, unreadable or invalid; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SampleParams(_Section):
    out: str = "data/sample"
    n_images: int = Field(3000, ge=1)
    image_size: int = Field(64, ge=16)
    max_digits: int = Field(4, ge=1, le=9)
    empty_fraction: float = Field(0.05, ge=0, le=1)
    seed: int = 0


class IngestParams(_Section):
    annotations: str = "data/sample/annotations.csv"
    format: Literal["auto", "tags_csv", "multihot_csv", "jsonl", "coco", "voc"] = "auto"
    images: str = "data/sample/images"  # "" = the annotations file's folder (VOC: its JPEGImages/)
    image_column: str = "image_name"
    tags_column: str = "tags"
    delimiter: str = " "
    no_label: str | None = None         # a tag meaning "no labels", e.g. "No Finding"
    voc_difficult: Literal["ignore", "positive"] = "ignore"
    allowed_labels: list[str] | None = None  # a fixed vocabulary: other labels reject the record
    strict: bool = False                # any rejected record fails the run
    max_rejected_fraction: float = Field(0.5, ge=0, le=1)  # more rejected than this fails the run
    image_size: int = Field(32, ge=8, le=1024)
    val_fraction: float = Field(0.15, ge=0, lt=1)
    test_fraction: float = Field(0.2, ge=0, lt=1)
    shard_size: int = Field(4096, ge=1)
    workers: int = Field(0, ge=0)
    cache: str | None = None  # folder of decoded images by content hash (params.yaml: data/ingest_cache)

    @model_validator(mode="after")
    def _splits_fit(self):
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be below 1 (nothing left to train on)")
        return self

    @field_validator("delimiter")
    @classmethod
    def _one_char(cls, v: str) -> str:
        if len(v) != 1:
            raise ValueError(f"must be a single character, got {v!r}")
        return v


class LabelsParams(_Section):
    pass


# Augmentation presets for train.augment.preset; keys given beside the preset override it.
AUGMENT_PRESETS = {
    "none": {"hflip": False, "vflip": False, "random_resized_crop": False, "color_jitter": 0.0, "cutout": 0.0},
    "digits": {"hflip": False, "vflip": False, "random_resized_crop": True, "crop_scale": (0.75, 1.0),
               "color_jitter": 0.0, "cutout": 0.0},  # no mirroring: a mirrored digit is another glyph
    "photos": {"hflip": True, "vflip": False, "random_resized_crop": True, "crop_scale": (0.5, 1.0),
               "color_jitter": 0.2, "cutout": 0.0},
    "strong": {"hflip": True, "vflip": False, "random_resized_crop": True, "crop_scale": (0.35, 1.0),
               "color_jitter": 0.3, "cutout": 0.25},
}


class AugmentParams(_Section):
    preset: Literal["none", "digits", "photos", "strong"] | None = None
    hflip: bool = False
    vflip: bool = False
    random_resized_crop: bool = True
    crop_scale: tuple[float, float] = (0.75, 1.0)
    color_jitter: float = Field(0.0, ge=0, le=1)  # brightness, contrast and saturation factors in 1 +- this
    cutout: float = Field(0.0, ge=0, lt=1)        # side of one zeroed square, as a fraction of the image side

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data):
        if isinstance(data, dict) and data.get("preset") in AUGMENT_PRESETS:
            return {**AUGMENT_PRESETS[data["preset"]], **data}
        return data

    @field_validator("crop_scale")
    @classmethod
    def _scale_range(cls, v):
        lo, hi = v
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"must satisfy 0 < min <= max <= 1, got {list(v)}")
        return v


class TrainParams(_Section):
    model: str = "resnet18"
    pretrained: str | None = None
    init_from: int | None = Field(None, ge=1)  # start from this registered version's weights (fine-tuning)
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(0.003, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    schedule: Literal["onecycle", "cosine"] = "onecycle"
    warmup_epochs: float = Field(1, ge=0)
    loss: Literal["bce", "focal", "asl"] = "bce"
    pos_weight: bool = False              # bce and focal: weight positives by negatives/positives per label
    focal_gamma: float = Field(2.0, ge=0)
    asl_gamma_pos: float = Field(0.0, ge=0)
    asl_gamma_neg: float = Field(4.0, ge=0)
    asl_clip: float = Field(0.05, ge=0, lt=1)
    ema_decay: float = Field(0.0, ge=0, lt=1)  # 0 = off; EMA weights are validated beside the raw ones
    freeze_epochs: int = Field(0, ge=0)   # train only the label head for this many epochs (with pretrained)
    patience: int = Field(6, ge=1)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    workers: int = Field(0, ge=0)         # 0: the train split is read into memory once; N: N DataLoader
                                          # processes read each batch from the shards (larger than memory)
    devices: int = Field(1, ge=1)         # > 1: DistributedDataParallel over this many processes (GPUs)
    compile: bool = False                 # torch.compile the model for training
    augment: AugmentParams = AugmentParams()
    eval_augment: Literal["none", "hflip"] = "none"  # test-time: average over the image and its mirror


class EvaluateParams(_Section):
    threshold_metric: Literal["f1", "precision_at_recall"] = "f1"
    min_recall: float = Field(0.9, gt=0, le=1)  # precision_at_recall: highest precision with recall >= this


class RegisterParams(_Section):
    name: str = Field("multitag", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    min_improvement: float = Field(0.0, ge=0)


class StoreParams(_Section):
    uri: str = "store"


class RetrainParams(_Section):
    inbox: str = "inbox"          # where new batches arrive: a folder (relative to the workspace) or s3://bucket/prefix
    archive: str = "inbox-archive"    # processed batches are moved here
    rejected: str = "inbox-rejected"  # unusable batches are moved here, with _report.json saying why
    raw: str = "data/raw"         # the accumulated raw data (images by content hash + annotations), DVC-tracked
    min_new_images: int = Field(50, ge=1)  # retrain once this many new or relabelled images are waiting
    cron: str = "0 3 * * *"       # schedule of the `retrain` deployment
    timezone: str = "UTC"
    work_pool: str = "multitag"   # a Prefect process work pool


# "register" is a section name here, not BaseModel's ABC method; pydantic warns about the name.
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class Params(_Section):
    sample: SampleParams = SampleParams()
    ingest: IngestParams = IngestParams()
    labels: LabelsParams = LabelsParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    register: RegisterParams = RegisterParams()
    store: StoreParams = StoreParams()
    retrain: RetrainParams = RetrainParams()


def _describe(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_params(raw: dict | None, source: str = PARAMS_FILE) -> Params:
    """Validate a params mapping; the store URI may be overridden by $MULTITAG_STORE_URI."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    raw = dict(raw)
    if os.environ.get(STORE_URI_ENV):
        raw["store"] = {**(raw.get("store") or {}), "uri": os.environ[STORE_URI_ENV]}
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe(err, source)) from None


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (run from the project workspace)") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return parse_params(raw, str(path))
