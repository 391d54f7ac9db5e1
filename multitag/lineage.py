"""The workspace's data lineage: which data set the pipeline reads, and what multitag records of it
in ``lineage.yaml``.

A workspace starts by reading the data set params.yaml's ``ingest`` points at. When retraining begins,
that data set is taken into the raw data (``retrain.raw``) as its first batch, ``origin``, and from
then on ingest reads the raw data, which only grows: ``lineage.yaml`` records the raw data's DVC hash
(so DVC reruns ingest when it changes), the origin, the version training fine-tunes from, and a store
set by ``$MULTITAG_STORE_URI``. params.yaml stays as the user wrote it.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from multitag.config import IngestParams, LineageParams, Params, load_params, store_env_override
from multitag.errors import LineageError
from multitag.layout import RAW_ANNOTATIONS, RAW_IMAGES, Layout
from multitag.registry import CHAMPION, open_registry
from multitag.report import write_atomic

ORIGIN_KEYS = ("annotations", "images")

LINEAGE_HEADER = """\
# Written by multitag, not by hand: this workspace's data lineage. The retrain flow updates it and
# commits it with dvc.lock; DVC tracks it as a params file, so a change here reruns what it affects.
#   raw:       once retraining began, the DVC hash of retrain.raw, which ingest then reads
#   batches:   batches in the raw data (the first, "origin", is the data set params.yaml pointed at)
#   origin:    that data set: params.yaml's ingest.annotations and ingest.images
#   init_from: the registered version the train stage fine-tunes from
#   store:     $MULTITAG_STORE_URI, recorded by `multitag run` when it overrides store.uri
"""


def write_lineage(layout: Layout, lineage: LineageParams) -> None:
    body = yaml.safe_dump({"lineage": lineage.model_dump(mode="json")}, sort_keys=False)
    write_atomic(layout.lineage, LINEAGE_HEADER + body)


def reset_lineage(root: str | Path = ".") -> None:
    """lineage.yaml back to a fresh workspace's (`make clean`)."""
    write_lineage(Layout(root), LineageParams())


def update_lineage(layout: Layout, params: Params, **changes) -> Params:
    """Record ``changes`` in lineage.yaml (only if they change something); returns the new params."""
    lineage = params.lineage.model_copy(update=changes)
    if lineage != params.lineage or not layout.lineage.exists():
        write_lineage(layout, lineage)
    return load_params(layout.params)


def record_store(layout: Layout, params: Params) -> Params:
    """Record $MULTITAG_STORE_URI (or its absence) in lineage.yaml, where DVC sees it: the register
    stage then reruns when the store changes. Called by the pipeline before it runs DVC."""
    return update_lineage(layout, params, store=store_env_override())


def check_store_env(params: Params) -> None:
    """A stage run by DVC directly must not use a store DVC has not recorded."""
    env = store_env_override()
    if env and env != params.lineage.store:
        raise LineageError(f"$MULTITAG_STORE_URI is {env!r} but lineage.yaml records "
                           f"{params.lineage.store or 'no override'} (store {params.store.uri!r}); DVC cannot see "
                           "environment variables: run `multitag run`, which records it, or unset MULTITAG_STORE_URI")


def origin_of(p: IngestParams) -> dict:
    return {k: getattr(p, k) for k in ORIGIN_KEYS}


def ingest_params(params: Params) -> IngestParams:
    """What ingest reads: params.yaml's data set until retraining began, the raw data since."""
    lineage = params.lineage
    if lineage.raw is None:
        return params.ingest
    if origin_of(params.ingest) != lineage.origin:
        o = lineage.origin or {}
        raise LineageError(
            f"params.yaml's ingest now reads {params.ingest.annotations} (images {params.ingest.images!r}), but this "
            f"workspace retrains from {params.retrain.raw}, which began from {o.get('annotations')} (images "
            f"{o.get('images')!r}) and holds {lineage.batches} batch(es). To add the new data to this model's data, "
            f"put ingest back and drop it in the inbox (`multitag inbox add FOLDER`); to train a new model on it, "
            f"start over with `make clean` (lineage.yaml back to its defaults) and set register.name to a new name")
    raw = params.retrain.raw.rstrip("/")
    return params.ingest.model_copy(update={"annotations": f"{raw}/{RAW_ANNOTATIONS}", "images": f"{raw}/{RAW_IMAGES}",
                                            "format": "jsonl"})


def check_data_set(params: Params, layout: Layout, labels: set[str]) -> None:
    """Stop a run on another data set than the one the registered champion was trained on (its labels
    are not all in this data), before a model of one data set is compared with a model of another."""
    if params.lineage.raw is not None:
        return  # the raw data is this model's data set by construction
    registry = open_registry(params, layout.root)
    champion = registry.alias(CHAMPION)
    if champion is None:
        return
    version = champion[0]["version"]
    known = champion[0].get("labels") or registry.card(version)["labels"]
    missing = sorted(set(known) - labels)
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise LineageError(
            f"{params.ingest.annotations} is another data set than the one model {registry.name!r} was trained "
            f"on: its champion v{version} in {registry.store.uri} knows labels this data lacks ({shown}). Set "
            f"register.name in params.yaml to a new name for this data set (its first version becomes its "
            f"champion), or start this workspace over with `make clean`")
