"""params.yaml -> typed, validated configuration objects.

The defaults below are params.yaml's values (``tests/test_config.py`` checks they agree): params.yaml
is the documented copy of them. Types are strict (``epochs: true`` or ``lr: "0.1"`` are refused) and
unknown keys are rejected, each error naming its key, e.g. ``train.lrr: unknown key``.

Beside the user's params.yaml, ``lineage.yaml`` holds what multitag itself records about the
workspace (where ingest reads once retraining has started, the version training fine-tunes from, an
overriding store): machine state kept out of the user's configuration, and tracked by DVC the same way.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from multitag.errors import ConfigError
from multitag.layout import LINEAGE, PARAMS

STORE_URI_ENV = "MULTITAG_STORE_URI"
LOCAL_MODELS = ("compact_cnn", "simple_cnn")  # multitag/models.py; anything else comes from torchvision


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True)


class SampleParams(_Section):
    out: str = "data/sample"
    preset: Literal["digits", "hard"] = "digits"  # hard: multitag/hard_data.py (photos, 18 long-tailed labels)
    n_images: int = Field(3000, ge=1)
    image_size: int = Field(64, ge=16)
    max_digits: int = Field(4, ge=1, le=9)        # digits only
    empty_fraction: float = Field(0.05, ge=0, le=1)  # digits only
    missing_tags: float = Field(0.15, ge=0, lt=1)  # hard only: share of train tags dropped from the annotations
    seed: int = 0

    @model_validator(mode="after")
    def _hard_is_large(self):
        if self.preset == "hard" and self.image_size < 96:
            raise ValueError("the hard preset draws images of 96 px or more (set image_size: 128)")
        return self


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
    val_fraction: float = Field(0.15, gt=0, lt=1)   # thresholds are tuned on validation: it must exist
    test_fraction: float = Field(0.2, gt=0, lt=1)   # models are compared on test: it must exist
    shard_size: int = Field(4096, ge=1)
    workers: int = Field(0, ge=0)

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
_LIGHT = {"hflip": True, "vflip": False, "random_resized_crop": True, "crop_scale": [0.75, 1.0],
          "color_jitter": 0.0, "cutout": 0.0}  # the default: mirror and mild crops (bench/RESULTS.md)
AUGMENT_PRESETS = {
    "none": {"hflip": False, "vflip": False, "random_resized_crop": False, "color_jitter": 0.0, "cutout": 0.0},
    "light": _LIGHT,
    "digits": {**_LIGHT, "hflip": False},  # light without the mirror: a mirrored digit is another glyph
    "photos": {"hflip": True, "vflip": False, "random_resized_crop": True, "crop_scale": [0.5, 1.0],
               "color_jitter": 0.2, "cutout": 0.0},
    "strong": {"hflip": True, "vflip": False, "random_resized_crop": True, "crop_scale": [0.35, 1.0],
               "color_jitter": 0.3, "cutout": 0.25},
}


class AugmentParams(_Section):
    preset: Literal["none", "light", "digits", "photos", "strong"] | None = "light"
    hflip: bool = True
    vflip: bool = False
    random_resized_crop: bool = True
    crop_scale: list[float] = [0.75, 1.0]
    rotation: float = Field(0.0, ge=0, le=180)    # degrees: each image turned by a random angle in +- this
    color_jitter: float = Field(0.0, ge=0, le=1)  # brightness, contrast and saturation factors in 1 +- this
    cutout: float = Field(0.0, ge=0, lt=1)        # side of one zeroed square, as a fraction of the image side
    mixup: float = Field(0.0, ge=0)               # alpha of mixup (0 = off): pairs of images and their targets blended

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data):
        if isinstance(data, dict):
            preset = data.get("preset", cls.model_fields["preset"].default)
            if preset in AUGMENT_PRESETS:
                return {**AUGMENT_PRESETS[preset], **data}
        return data

    @field_validator("crop_scale")
    @classmethod
    def _scale_range(cls, v):
        if len(v) != 2 or not 0 < v[0] <= v[1] <= 1:
            raise ValueError(f"must be [min, max] with 0 < min <= max <= 1, got {list(v)}")
        return v


class KubernetesJobParams(_Section):
    """The Indexed Job of a multi-node training on Kubernetes (train.launcher: kubernetes)."""
    image: str | None = None            # the image built from infra/Dockerfile
    namespace: str = "default"
    gpus: int = Field(1, ge=0)          # per node (pod)
    aws_secret: str = "multitag-aws"    # a Secret with the AWS credentials, passed with envFrom
    shm_size: str = "8Gi"
    deadline_s: int = Field(86400, ge=60)         # the Job's activeDeadlineSeconds: a training that hangs ends
    keep_finished_s: int = Field(86400, ge=0)     # ttlSecondsAfterFinished: then the Job and its pods go
    service_account: str = "multitag-train"       # infra/kubernetes/rbac.yaml (the pods need no API access)


class TrainParams(_Section):
    # Any torchvision classification model by name, compact_cnn or simple_cnn (see README).
    model: str = "compact_cnn"
    head: Literal["linear", "mldecoder"] = "linear"  # mldecoder: label queries attending over spatial features
    pretrained: str | None = None  # a local weights file, or torchvision weights by name (ResNet18_Weights.IMAGENET1K_V1)
    epochs: int = Field(20, ge=1)
    time_budget_s: float | None = Field(None, gt=0)  # fit the number of epochs (and the schedule) to this many
                                                     # seconds of training, from the measured speed (epochs ignored)
    batch_size: int = Field(32, ge=1)
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
    devices: int = Field(1, ge=1)         # > 1: DistributedDataParallel over this many processes (GPUs) per node
    nodes: int = Field(1, ge=1)           # > 1: torchrun on this many machines, meeting at rdzv_endpoint
    rdzv_endpoint: str | None = Field(None, pattern=r"^[^\s:]+:[0-9]+$")  # host:port, the same on every node
    rdzv_id: str = Field("multitag", pattern=r"^[A-Za-z0-9_.-]+$")
    join_timeout_s: float = Field(600, gt=0)  # a node that never arrives ends the run after this long
    launcher: Literal["local", "kubernetes"] = "local"  # kubernetes: the stage runs an Indexed Job of `nodes` pods
    kubernetes: KubernetesJobParams = KubernetesJobParams()
    compile: bool = False                 # torch.compile the model for training
    augment: AugmentParams = AugmentParams()
    eval_augment: Literal["none", "hflip"] = "none"  # test-time: average over the image and its mirror

    @model_validator(mode="after")
    def _one_process_per_gpu(self):
        gpus = self.kubernetes.gpus
        if self.launcher == "kubernetes" and gpus and gpus != self.devices:
            raise ValueError(f"train.kubernetes.gpus ({gpus}) must equal train.devices ({self.devices}): each "
                             f"node runs one training process per GPU, so {abs(gpus - self.devices)} would be "
                             f"{'idle' if gpus > self.devices else 'missing'}; set both to the GPUs of a node")
        return self

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        if v in LOCAL_MODELS:
            return v
        import torchvision
        if v not in torchvision.models.list_models(module=torchvision.models):
            raise ValueError(f"unknown model {v!r}; choose compact_cnn, simple_cnn or a torchvision "
                             "classification model such as resnet18, resnet50, efficientnet_b0, mobilenet_v3_small")
        return v


class EvaluateParams(_Section):
    threshold_metric: Literal["f1", "precision_at_recall"] = "f1"
    min_recall: float = Field(0.9, gt=0, le=1)  # precision_at_recall: highest precision with recall >= this


class RegisterParams(_Section):
    name: str = Field("multitag", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    min_improvement: float = Field(0.0, ge=0)


class ReviewParams(_Section):
    enabled: bool = False         # the review stage trains `folds` models: off unless asked for
    folds: int = Field(5, ge=2, le=20)  # out-of-sample probabilities from this many folds (fewer: weaker models)
    repeats: int = Field(2, ge=1, le=5)  # the folds drawn this many times, each image's probabilities averaged
    epochs: int | None = Field(None, ge=1)  # of each fold model (default: twice train.epochs)
    time_budget_s: float | None = Field(None, gt=0)  # seconds of training per fold (default: train's budget, if any)
    threshold: float = Field(0.5, ge=0.5, lt=1)  # likely missing: not given, calibrated chance it shows >= this


class StoreParams(_Section):
    uri: str = "store"


class RetrainParams(_Section):
    inbox: str = "inbox"          # where new batches arrive: a folder (relative to the workspace) or s3://bucket/prefix
    archive: str = "inbox-archive"    # processed batches are moved here
    rejected: str = "inbox-rejected"  # unusable batches are moved here, with _report.json saying why
    raw: str = "data/raw"         # the accumulated raw data (images by content hash + annotations), DVC-tracked
    min_new_images: int = Field(50, ge=1)  # retrain once this many new or relabelled images are waiting
    alert_drop: float = Field(0.1, gt=0, le=1)  # flag a batch the champion scores this much mAP below its test
    alert_webhook: str | None = Field(None, pattern=r"^https?://\S+$")  # Slack-compatible incoming webhook for alerts
    alert_block: str | None = None    # or an existing Prefect notification block, by name
    alert_stale_versions: int = Field(3, ge=1)  # alert when this many registrations in a row left the champion
    alert_no_retrain_s: int = Field(3 * 86400, ge=60)  # alert when no retrain completed for this long
    cron: str = "0 3 * * *"       # schedule of the `retrain` deployment
    timezone: str = "UTC"
    work_pool: str = "multitag"   # a Prefect process work pool


class ComputeParams(_Section):
    """Which engine runs the image work of ingest and predict (multitag/compute.py)."""
    dask: str | None = Field(None, pattern=r"^(local:[1-9][0-9]*|tcp://[^\s/]+:[0-9]+)$")  # null | local:N | tcp://host:port
    chunk: int = Field(256, ge=1)  # images per task
    worker_wait_s: float = Field(180, gt=0)  # a run with no Dask worker for this long ends with an error


def duration_s(text: str) -> float:
    """Seconds in a duration such as ``20m``, ``1h30m``, ``90s`` or ``900`` (seconds)."""
    m = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?", str(text).strip())
    if not m or not any(m.groups()):
        raise ValueError(f"{text!r} is not a duration such as 20m, 1h30m, 90s or 900 (seconds)")
    hours, minutes, seconds = (float(g or 0) for g in m.groups())
    return hours * 3600 + minutes * 60 + seconds


class TuneParams(_Section):
    """`multitag tune`: the search space and budget (multitag/tune.py). Ranges are [low, high], searched
    on a log scale; lists are the choices. The defaults hold for photos."""
    budget: str = "20m"           # wall-clock time of one `multitag tune` (default of --budget)
    trial_s: float | None = Field(None, ge=10)  # seconds of training per trial (null: the study's, or a sixth of
                                                # its first budget, at least 60 s)
    seed: int = 0                 # the sampler's seed
    parallel: int = Field(1, ge=1)  # trials trained at once, each a task on compute.dask's cluster (needs it when > 1)
    min_gain: float = Field(0.005, ge=0)  # the best trial replaces the recipe only if its val mAP is this much higher
    lr: list[float] = [0.0003, 0.01]
    weight_decay: list[float] = [0.001, 0.2]
    batch_size: list[int] = [16, 32, 64]
    schedule: list[Literal["onecycle", "cosine"]] = ["onecycle", "cosine"]
    loss: list[Literal["bce", "focal", "asl"]] = ["bce", "focal", "asl"]
    ema_decay: list[float] = [0.0, 0.999]
    augment: list[Literal["none", "light", "digits", "photos", "strong"]] = ["none", "light", "photos", "strong"]
    head: list[Literal["linear", "mldecoder"]] = ["linear"]
    model: list[str] = []         # models to try (compact_cnn, resnet18, ...); empty: train.model only

    @field_validator("budget")
    @classmethod
    def _duration(cls, v: str) -> str:
        if duration_s(v) < 60:
            raise ValueError(f"{v!r} is under a minute: too short for one trial")
        return v

    @field_validator("lr", "weight_decay")
    @classmethod
    def _range(cls, v: list[float]) -> list[float]:
        if len(v) != 2 or not 0 < v[0] < v[1]:
            raise ValueError(f"must be [low, high] with 0 < low < high, got {list(v)}")
        return v

    @field_validator("batch_size", "schedule", "loss", "ema_decay", "augment", "head")
    @classmethod
    def _choices(cls, v: list, info) -> list:
        if not v:
            raise ValueError("needs at least one choice")
        if info.field_name in ("batch_size", "ema_decay"):  # the others are typed with their choices
            for value in v:
                TrainParams.model_validate({info.field_name: value})
        return v

    @field_validator("model")
    @classmethod
    def _models(cls, v: list[str]) -> list[str]:
        for value in v:
            TrainParams.model_validate({"model": value})
        return v


class LineageParams(_Section):
    """lineage.yaml: written by multitag (the retrain flow, `multitag run`), never by hand."""
    raw: str | None = None        # the DVC hash of retrain.raw once ingest reads it instead of params' ingest
    batches: int = Field(0, ge=0)  # batches in the raw data (the first is the data set retraining began with)
    origin: dict | None = None    # that first data set: params.yaml's ingest.annotations / images / format
    init_from: int | None = Field(None, ge=1)  # the registered version the train stage fine-tunes from
    store: str | None = None      # the store in $MULTITAG_STORE_URI when it overrides store.uri


class Params(_Section):
    sample: SampleParams = SampleParams()
    ingest: IngestParams = IngestParams()
    labels: LabelsParams = LabelsParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    # "register" would shadow BaseModel's ABC method; the field has another name, the key stays.
    register_: RegisterParams = Field(RegisterParams(), alias="register")
    review: ReviewParams = ReviewParams()
    store: StoreParams = StoreParams()
    retrain: RetrainParams = RetrainParams()
    compute: ComputeParams = ComputeParams()
    tune: TuneParams = TuneParams()
    lineage: LineageParams = LineageParams()  # from lineage.yaml, not params.yaml

    @property
    def register(self) -> RegisterParams:
        return self.register_

    @model_validator(mode="after")
    def _pods_reach_the_store(self):
        if self.train.launcher == "kubernetes" and self.train.nodes > 1 and not self.store.uri.startswith("s3://"):
            raise ValueError(f"train.launcher kubernetes needs store.uri on S3 (s3://bucket/prefix), not "
                             f"{self.store.uri!r}: the training pods put the model and checkpoints there, and "
                             "cannot reach a folder of this machine")
        if self.tune.parallel > 1 and self.compute.dask is None:
            raise ValueError(f"tune.parallel {self.tune.parallel} trains that many trials at once on a Dask cluster, "
                             f"and compute.dask is null: set it to local:{self.tune.parallel} (processes on this "
                             "machine) or tcp://scheduler:8786, or set tune.parallel to 1")
        return self

    def dump(self) -> dict:
        """Every section as plain JSON values, keyed as in params.yaml (for model cards)."""
        return self.model_dump(mode="json", by_alias=True)


def _describe(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        elif e["type"] == "value_error" and not e["loc"]:  # a check across sections: its message names the keys
            lines.append(f"  {e['ctx']['error']}")
        elif e["type"] == "value_error":  # a check of this section's keys together: the input is the section
            lines.append(f"  {key}: {e['ctx']['error']}")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_params(raw: dict | None, source: str = PARAMS, lineage: dict | None = None) -> Params:
    """Validate a params mapping (and the lineage section); the lineage's recorded store overrides
    store.uri."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    if "lineage" in raw:
        raise ConfigError(f"{source}: lineage: unknown key (the lineage lives in {LINEAGE}, written by multitag)")
    try:
        p = Params.model_validate({**raw, "lineage": lineage or {}})
    except ValidationError as err:
        raise ConfigError(_describe(err, source)) from None
    if p.lineage.store:
        p = p.model_copy(update={"store": StoreParams(uri=p.lineage.store)})
    return p


def _read_yaml(path: Path):
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (run from the project workspace)") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None


def load_params(path: str | Path = PARAMS) -> Params:
    """Read and validate params.yaml and, beside it, lineage.yaml (absent = a fresh lineage)."""
    path = Path(path)
    raw = _read_yaml(path)
    lineage_file = path.with_name(LINEAGE)
    lineage = (_read_yaml(lineage_file) or {}) if lineage_file.exists() else {}
    if not isinstance(lineage, dict) or set(lineage) - {"lineage"}:
        raise ConfigError(f"{lineage_file}: expected one section, lineage (the file is written by multitag)")
    return parse_params(raw, str(path), lineage.get("lineage"))


def store_env_override() -> str | None:
    return os.environ.get(STORE_URI_ENV) or None
