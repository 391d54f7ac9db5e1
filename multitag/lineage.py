"""The workspace's data lineage: which data set the pipeline reads, what multitag records of it in
``lineage.yaml``, the append-only raw data that retraining grows, and the retrain flow's plain-Python
steps (plan, commit). The Prefect flow (flows/retrain.py) runs these steps around the training pipeline.

A workspace starts by reading the data set params.yaml's ``ingest`` points at. When retraining begins,
that data set is taken into the raw data (``retrain.raw``) as its first batch, ``origin``, and from
then on ingest reads the raw data, which only grows: ``lineage.yaml`` records the raw data's DVC hash
(so DVC reruns ingest when it changes), the origin, the version training fine-tunes from, and a store
set by ``$MULTITAG_STORE_URI``. params.yaml stays as the user wrote it.

The raw data (``retrain.raw``, versioned with ``dvc add``):

- ``images/<sha256><ext>``: every accepted image once, named by its content;
- ``batches.json``: the ledger, one entry per applied batch with its rows (image -> labels). It is
  written atomically and is the commit point: a batch in the ledger is never applied again;
- ``annotations.jsonl``: what ingest reads, derived from the ledger (a later batch's labels for a
  known image replace the earlier ones).
"""

from __future__ import annotations

import fcntl
import json
import logging
import subprocess
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import yaml

from multitag.config import IngestParams, LineageParams, Params, load_params, store_env_override
from multitag.errors import LineageError
from multitag.images import IMAGE_SUFFIXES
from multitag.layout import Layout
from multitag.registry import CHAMPION, Registry
from multitag.report import read_json, write_atomic, write_json
from multitag.storage import open_store

log = logging.getLogger(__name__)

LEDGER = "batches.json"
ANNOTATIONS = "annotations.jsonl"
IMAGES = "images"
ORIGIN = "origin"        # the ledger name of the data set retraining began with
ORIGIN_KEYS = ("annotations", "images")
RETRAIN_STATE = "retrain.json"  # in the workspace's scratch: the batches a finished training saw

LINEAGE_HEADER = """\
# Written by multitag, not by hand: this workspace's data lineage. The retrain flow updates it and
# commits it with dvc.lock; DVC tracks it as a params file, so a change here reruns what it affects.
#   raw:       once retraining began, the DVC hash of retrain.raw, which ingest then reads
#   batches:   batches in the raw data (the first, "origin", is the data set params.yaml pointed at)
#   origin:    that data set: params.yaml's ingest.annotations and ingest.images
#   init_from: the registered version the train stage fine-tunes from
#   store:     $MULTITAG_STORE_URI, recorded by `multitag run` when it overrides store.uri
"""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -- lineage.yaml ---------------------------------------------------------------------------------

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
    return params.ingest.model_copy(update={"annotations": f"{raw}/{ANNOTATIONS}", "images": f"{raw}/{IMAGES}",
                                            "format": "jsonl"})


def check_data_set(params: Params, layout: Layout, labels: set[str]) -> None:
    """Stop a run on another data set than the one the registered champion was trained on (its labels
    are not all in this data), before a model of one data set is compared with a model of another."""
    if params.lineage.raw is not None:
        return  # the raw data is this model's data set by construction
    registry = Registry(open_store(params.store.uri, layout.root), params.register.name)
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


# -- the raw data -----------------------------------------------------------------------------------

class RawData:
    """The append-only raw data folder (see the module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def ledger(self) -> list[dict]:
        path = self.root / LEDGER
        return read_json(path) if path.exists() else []

    @staticmethod
    def fold(ledger: list[dict]) -> dict[str, dict]:
        """Content hash -> {"image", "labels"}: the current labels of every image."""
        rows: dict[str, dict] = {}
        for entry in ledger:
            rows.update(entry["rows"])
        return rows

    def write_annotations(self, ledger: list[dict]) -> None:
        write_atomic(self.root / ANNOTATIONS, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                      for r in self.fold(ledger).values()))

    def apply(self, name: str, fingerprint: str, content, source: str) -> dict:
        """Append a validated batch (``content``: a BatchContent): copy its new images, then commit its
        ledger entry. Returns the entry."""
        ledger = self.ledger()
        current = self.fold(ledger)
        known_labels = {t for r in current.values() for t in r["labels"]}
        rows: dict[str, dict] = {}
        added, duplicates, relabelled = 0, 0, []
        for image, digest, tags in content.images:
            ext = Path(image).suffix.lower()
            row = {"image": f"{digest}{ext if ext in IMAGE_SUFFIXES else ''}", "labels": list(tags)}
            before = rows.get(digest) or current.get(digest)
            if before is None:
                added += 1
            elif before["labels"] != row["labels"]:
                relabelled.append({"image": image, "before": before["labels"], "after": row["labels"]})
                row["image"] = before["image"]
            else:
                duplicates += 1
                continue
            dest = self.root / IMAGES / row["image"]
            if not dest.exists():
                write_atomic(dest, content.read(image))
            rows[digest] = row
        entry = {"batch": name, "fingerprint": fingerprint, "source": source, "applied": _now(),
                 "records": content.records, "added": added, "relabelled": relabelled, "duplicates": duplicates,
                 "rejected": content.rejected,
                 "new_labels": sorted({t for r in rows.values() for t in r["labels"]} - known_labels),
                 "rows": rows}
        ledger.append(entry)
        write_json(self.root / LEDGER, ledger)
        self.write_annotations(ledger)
        log.info("batch %s: %d new image(s), %d relabelled, %d duplicate(s), %d record(s) rejected",
                 name, added, len(relabelled), duplicates, len(content.rejected))
        return entry


def summary(entry: dict) -> dict:
    """A ledger entry without its rows (for reports)."""
    return {k: v for k, v in entry.items() if k != "rows"}


def dvc_hash(dvc_file: Path) -> str | None:
    """The md5 DVC recorded for what a .dvc file tracks."""
    if not dvc_file.exists():
        return None
    outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or [{}]
    return outs[0].get("md5")


# -- the retrain flow's steps ---------------------------------------------------------------------

@contextmanager
def retrain_lock(workspace: Path):
    """One retrain at a time per workspace (whatever started it: schedule, worker, by hand)."""
    path = workspace / ".dvc" / "tmp" / "multitag-retrain.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another retrain holds %s; waiting for it to finish", path)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def load_state(layout: Layout) -> dict:
    path = layout.root / ".multitag" / RETRAIN_STATE
    return {"trained": [], **(read_json(path) if path.exists() else {})}


def save_state(layout: Layout, state: dict) -> None:
    write_json(layout.root / ".multitag" / RETRAIN_STATE, state)


def plan(params: Params, layout: Layout, force: bool = False) -> dict:
    """Whether to train now, and from what: fine-tune from the champion when the label vocabulary
    would be unchanged, train afresh when it changed (or there is no champion). New labels are
    counted against the champion's vocabulary."""
    raw = RawData(layout.root / params.retrain.raw)
    ledger = raw.ledger()
    trained = load_state(layout)["trained"]
    pending = [e for e in ledger if e["batch"] not in trained and e["batch"] != ORIGIN]
    vocabulary = sorted({t for r in raw.fold(ledger).values() for t in r["labels"]})
    out = {"pending_batches": [e["batch"] for e in pending],
           "new_images": sum(e["added"] + len(e["relabelled"]) for e in pending),
           "added": sum(e["added"] for e in pending), "relabelled": sum(len(e["relabelled"]) for e in pending),
           "labels": len(vocabulary), "new_labels": vocabulary, "min_new_images": params.retrain.min_new_images,
           "train": False, "init_from": None, "champion": None, "champion_map": None}
    registry = Registry(open_store(params.store.uri, layout.root), params.register.name)
    champion = registry.alias(CHAMPION)
    if champion is not None:
        version = champion[0]["version"]
        champion_labels = registry.card(version)["labels"]
        out.update(champion=version, champion_map=champion[0]["test_map"],
                   new_labels=sorted(set(vocabulary) - set(champion_labels)))
    if not ledger:
        out["reason"] = "no raw data yet: add a batch to the inbox (multitag inbox add FOLDER)"
    elif not force and not pending:
        out["reason"] = "no new images since the last training"
    elif not force and out["new_images"] < params.retrain.min_new_images:
        out["reason"] = (f"{out['new_images']} new or relabelled image(s) waiting, fewer than "
                         f"retrain.min_new_images ({params.retrain.min_new_images})")
    elif champion is None:
        out.update(train=True, reason="training from scratch: no champion yet")
    elif vocabulary == champion_labels:
        out.update(train=True, init_from=version, reason=f"fine-tuning from champion v{version} (label vocabulary unchanged)")
    else:
        out.update(train=True, reason=f"training from scratch: new label(s) {out['new_labels']}" if out["new_labels"]
                   else f"training from scratch: champion v{version} has another label vocabulary")
    return out


def commit_message(plan_: dict, result: dict | None) -> str:
    """``retrain: +N images, ...`` with the test mAP change measured on one test set: the champion
    re-scored on the candidate's test images (the register stage's own comparison)."""
    parts = [f"+{plan_['added']} images"]
    if plan_["relabelled"]:
        parts.append(f"{plan_['relabelled']} relabelled")
    if plan_["new_labels"]:
        parts.append(f"{len(plan_['new_labels'])} new label{'s' if len(plan_['new_labels']) > 1 else ''}")
    if result is None:
        return f"retrain: {', '.join(parts)} (not trained: {plan_['reason']})"
    compared = result.get("champion_map") is not None
    before = f"{result['champion_map']:.3f}" if compared else "none"
    after = result["compared_map"] if compared and result.get("compared_map") is not None else result["test_map"]
    verdict = "promoted" if result["champion"] else "not promoted"
    return f"retrain: {', '.join(parts)}, mAP {before} → {after:.3f} (v{result['version']} {verdict})"


def commit_paths(workspace: Path, paths: list[str], message: str) -> str | None:
    """Commit ``paths`` (only those) if the workspace is a git repository and they changed.
    Returns the new commit's short hash, or None when nothing was committed."""
    def git(*args, check=True):
        return subprocess.run(["git", *args], cwd=workspace, capture_output=True, text=True, check=check)

    if git("rev-parse", "--is-inside-work-tree", check=False).returncode != 0:
        return None
    paths = [p for p in paths if (workspace / p).exists()]
    try:
        git("add", "--", *paths)
        if git("diff", "--cached", "--quiet", "--", *paths, check=False).returncode == 0:
            return None
        git("commit", "-q", "-m", message, "--", *paths)
    except subprocess.CalledProcessError as err:
        log.warning("git commit of %s failed: %s", paths, err.stderr.strip())
        return None
    return git("rev-parse", "--short", "HEAD").stdout.strip()
