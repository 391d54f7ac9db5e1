"""Where everything is: the workspace's files, which stage writes which, and the manifest's schema.

Every stage, flow, the registry and the tests take their paths from here; ``tests/test_layout.py``
checks that dvc.yaml declares exactly ``STAGE_OUTPUTS`` and that each stage's code ``deps`` are the
modules it imports.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

PARAMS = "params.yaml"
LINEAGE = "lineage.yaml"          # machine-written state of the data lineage (multitag/lineage.py)

# Stage outputs, relative to the workspace.
SAMPLE = "data/sample"            # the default of sample.out
PREPARED = "data/prepared"        # ingest: uint8 shards + manifest
MANIFEST = "manifest.parquet"     # inside PREPARED
SHARDS = "shards"                 # inside PREPARED: 00000.npy, 00001.npy, ...
LABELS = "data/labels"            # labels: vocabulary + multi-hot targets
VOCABULARY = "vocabulary.json"    # inside LABELS
TARGETS = "targets.npy"           # inside LABELS, rows aligned with the manifest
MODEL = "models/model.pt"         # train
INGEST_SUMMARY = "reports/ingest.json"
INGEST_ISSUES = "reports/ingest_issues.csv"
LABELS_SUMMARY = "reports/labels.json"
LABEL_STATS = "reports/label_stats.json"
LABEL_STATS_PLOT = "reports/plots/label_stats.png"
TRAIN_SUMMARY = "reports/train.json"
TRAIN_HISTORY = "reports/train_history.csv"
METRICS = "reports/metrics.json"
THRESHOLDS = "reports/thresholds.json"
PER_LABEL = "reports/per_label.csv"
PR_CURVES = "reports/plots/pr"    # one CSV per label (DVC plots)
PR_PLOT = "reports/plots/pr_curves.png"
REGISTRATION = "reports/registration.json"
LABEL_ISSUES = "reports/label_issues.csv"       # review
LABEL_ISSUES_PLOT = "reports/plots/label_issues.png"
REVIEW_SUMMARY = "reports/review.json"

# Not outputs: state a workspace keeps between runs, never versioned (git- and DVC-ignored).
SCRATCH = ".multitag"
CHECKPOINT = ".multitag/checkpoints/last.pt"   # a killed training run resumes from here
DECODE_CACHE = ".multitag/decode-cache"        # decoded images by content hash: re-ingest skips them
RUN_LOG = ".multitag/runs"                     # per-stage timings of the latest run (vary run to run)
RETRAIN_STATE = ".multitag/retrain.json"       # the batches a finished training saw (flows/retrain_steps.py)
PREFECT_SERVER_LOG = ".multitag/prefect-server.log"  # the server `multitag serve` starts
TUNE = ".multitag/tune"                        # `multitag tune`: the Optuna study (study.db) and trial models

# Inside the raw data (retrain.raw, multitag/rawdata.py), which ingest reads once retraining began.
LEDGER = "batches.json"           # one entry per applied batch, with its rows
RAW_ANNOTATIONS = "annotations.jsonl"  # what ingest reads, derived from the ledger
RAW_IMAGES = "images"             # every accepted image once, named by its content hash
ORIGIN = "origin"                 # the ledger name of the data set retraining began with
BATCH_CHECKS = "batch_checks.csv"  # the champion on each new batch, appended by the retrain flow (drift.py)

# What each dvc.yaml stage writes, as dvc.yaml declares it (checked by tests/test_layout.py).
STAGE_OUTPUTS: dict[str, dict[str, list[str]]] = {
    "sample": {"outs": ["${sample.out}"]},
    "ingest": {"outs": [PREPARED, INGEST_SUMMARY, INGEST_ISSUES]},
    "labels": {"outs": [LABELS, LABELS_SUMMARY, LABEL_STATS, LABEL_STATS_PLOT]},
    "train": {"outs": [MODEL, TRAIN_SUMMARY, TRAIN_HISTORY]},
    "evaluate": {"outs": [THRESHOLDS, PER_LABEL, PR_CURVES, PR_PLOT], "metrics": [METRICS]},
    "register": {"outs": [REGISTRATION]},
    "review": {"outs": [LABEL_ISSUES, LABEL_ISSUES_PLOT], "metrics": [REVIEW_SUMMARY]},
}
# The module holding each stage's function (its code deps are what this module imports).
STAGE_MODULES = {"sample": "multitag.sample_data", "ingest": "multitag.ingest", "labels": "multitag.labels",
                 "train": "multitag.train", "evaluate": "multitag.evaluate", "register": "multitag.champion",
                 "review": "multitag.review"}
# What `multitag run` and `dvc repro` run, in order. The sample stage runs even when ingest reads other
# data (a few seconds): one graph, so that `git clone` + `dvc pull` restores every stage's outputs.
PIPELINE = ["sample", "ingest", "labels", "train", "evaluate", "register", "review"]

# manifest.parquet: one row per accepted image, sorted by sha256; row i <-> targets.npy row i.
MANIFEST_COLUMNS = {
    "id": "str",          # first 16 hex digits of sha256
    "source": "str",      # the image path as the annotations wrote it
    "sha256": "str",      # content hash of the image file
    "split": "str",       # train | val | test, from the content hash
    "tags": "list[str]",  # the image's labels, sorted
    "shard": "int64",     # shard file number
    "offset": "int64",    # row inside the shard
}


def split_for(digest: str, val_fraction: float, test_fraction: float) -> str:
    """train/val/test from the content hash alone, so adding images never moves an old one."""
    u = int(digest[:16], 16) / 2**64
    if u < test_fraction:
        return "test"
    return "val" if u < test_fraction + val_fraction else "train"


class Layout:
    """The paths of one workspace (``root``): ``Layout(ws).prepared``, ``.model``, ``.metrics`` ..."""

    def __init__(self, root: str | Path = "."):
        self.root = Path(root)
        r = self.root
        self.params, self.lineage = r / PARAMS, r / LINEAGE
        self.prepared, self.labels = r / PREPARED, r / LABELS
        self.manifest, self.shards = self.prepared / MANIFEST, self.prepared / SHARDS
        self.vocabulary, self.targets = self.labels / VOCABULARY, self.labels / TARGETS
        self.model = r / MODEL
        self.ingest_summary, self.ingest_issues = r / INGEST_SUMMARY, r / INGEST_ISSUES
        self.labels_summary, self.label_stats, self.label_stats_plot = (
            r / LABELS_SUMMARY, r / LABEL_STATS, r / LABEL_STATS_PLOT)
        self.train_summary, self.train_history = r / TRAIN_SUMMARY, r / TRAIN_HISTORY
        self.metrics, self.thresholds, self.per_label = r / METRICS, r / THRESHOLDS, r / PER_LABEL
        self.pr_curves, self.pr_plot = r / PR_CURVES, r / PR_PLOT
        self.registration = r / REGISTRATION
        self.label_issues, self.label_issues_plot, self.review_summary = (
            r / LABEL_ISSUES, r / LABEL_ISSUES_PLOT, r / REVIEW_SUMMARY)
        self.scratch, self.checkpoint, self.decode_cache, self.run_log = (
            r / SCRATCH, r / CHECKPOINT, r / DECODE_CACHE, r / RUN_LOG)
        self.retrain_state, self.prefect_server_log = r / RETRAIN_STATE, r / PREFECT_SERVER_LOG

    def shard(self, number: int) -> Path:
        return self.shards / f"{number:05d}.npy"


def read_manifest(layout: Layout, columns: list[str] | None = None) -> pd.DataFrame:
    return pd.read_parquet(layout.manifest, columns=columns)
