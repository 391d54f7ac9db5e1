"""Scheduled retraining, the plain-Python part: take in inbox batches, decide whether and how to
train, point params.yaml at the raw data, and commit what changed to git. The Prefect flow
(flows/retrain.py) runs these steps and the training pipeline between them.

Progress is recorded so that a run killed at any point and run again ends as an uninterrupted
run would: the raw data's ledger says which batches were applied, and ``<raw>.retrain.json`` which
of them were versioned with DVC and which a finished training run has seen.
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import subprocess
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from ruamel.yaml import YAML

from multitag.config import Params
from multitag.inbox import ANNOTATIONS, IMAGES, REPORT, BatchRejected, Inbox, RawData, read_batch, summary
from multitag.labels import build_vocabulary
from multitag.layout import Layout
from multitag.registry import CHAMPION, Registry
from multitag.report import write_atomic
from multitag.storage import open_store

log = logging.getLogger(__name__)


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


def state_path(params: Params, workspace: Path) -> Path:
    return workspace / (params.retrain.raw.rstrip("/") + ".retrain.json")


def load_state(path: Path) -> dict:
    state = json.loads(path.read_text()) if path.exists() else {}
    return {"versioned": [], "trained": [], **state}


def save_state(path: Path, state: dict) -> None:
    write_atomic(path, (json.dumps(state, indent=1) + "\n").encode())


def take_in(params: Params, workspace: Path) -> dict:
    """Apply every complete batch not applied yet to the raw data, move it to the archive (or, if
    unusable, to the rejected area with its report); finish moves that a stopped run left undone."""
    raw = RawData(workspace / params.retrain.raw)
    inbox = Inbox(params, workspace)
    ledger = {e["batch"]: e for e in raw.ledger()}
    applied, rejected = [], []
    for name in inbox.ready():
        if name in ledger:
            continue  # applied by a run that stopped before archiving it: archived below
        try:
            options, fingerprint = inbox.marker(name)
            with tempfile.TemporaryDirectory() as tmp:
                inbox.download(name, Path(tmp))
                content = read_batch(Path(tmp), options, params.ingest)
        except BatchRejected as err:
            report = {"batch": name, "rejected_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      "reason": str(err), "rejected_records": err.rejected}
            log.warning("batch %s rejected: %s", name, err)
            inbox.finish(name, inbox.rejected, report)
            rejected.append(report)
            continue
        entry = raw.apply(name, fingerprint, content, inbox.incoming.url(name))
        ledger[name] = entry
        applied.append(summary(entry))
    for name in inbox.batches():
        if name in ledger:
            inbox.finish(name, inbox.archive, summary(ledger[name]))
        elif inbox.rejected.exists(f"{name}/{REPORT}"):
            inbox.finish(name, inbox.rejected, {})  # already copied there: only the deletion was left
    return {"applied": applied, "rejected": rejected, "batches": list(ledger)}


def raw_ingest_params(params: Params) -> dict:
    """The ingest settings that read the raw data."""
    raw = params.retrain.raw.rstrip("/")
    return {"annotations": f"{raw}/{ANNOTATIONS}", "images": f"{raw}/{IMAGES}", "format": "jsonl"}


def update_params(path: Path, changes: dict[str, dict]) -> list[str]:
    """Set keys in params.yaml, keeping its comments and layout; returns the keys changed."""
    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    data = yaml.load(path.read_text(encoding="utf-8")) or {}
    changed = []
    for section, values in changes.items():
        if data.get(section) is None:
            data[section] = {}
        for key, value in values.items():
            if data[section].get(key) != value:
                data[section][key] = value
                changed.append(f"{section}.{key}")
    if changed:
        text = io.StringIO()
        yaml.dump(data, text)
        write_atomic(path, text.getvalue().encode())
    return changed


def plan(params: Params, workspace: Path, force: bool = False) -> dict:
    """Whether to train now, and from what: fine-tune from the champion when the label vocabulary
    would be unchanged, train afresh when labels were added (or there is no champion)."""
    raw = RawData(workspace / params.retrain.raw)
    ledger = raw.ledger()
    state = load_state(state_path(params, workspace))
    pending = [e for e in ledger if e["batch"] not in state["trained"]]
    new_images = sum(e["added"] + len(e["relabelled"]) for e in pending)
    out = {"pending_batches": [e["batch"] for e in pending], "new_images": new_images,
           "added": sum(e["added"] for e in pending), "relabelled": sum(len(e["relabelled"]) for e in pending),
           "new_labels": sorted({t for e in pending for t in e["new_labels"]}),
           "min_new_images": params.retrain.min_new_images, "train": False, "init_from": None,
           "champion": None, "champion_map": None}
    if not ledger:
        out["reason"] = "no raw data yet: add a batch to the inbox (multitag inbox add FOLDER)"
        return out
    if not force and not pending:
        out["reason"] = "no new images since the last training"
        return out
    if not force and new_images < params.retrain.min_new_images:
        out["reason"] = (f"{new_images} new or relabelled image(s) waiting, fewer than retrain.min_new_images "
                         f"({params.retrain.min_new_images})")
        return out
    out["train"] = True
    registry = Registry(open_store(params.store.uri, workspace), params.register.name)
    champion = registry.alias(CHAMPION)
    if champion is None:
        out["reason"] = "training from scratch: no champion yet"
        return out
    version = champion[0]["version"]
    out.update(champion=version, champion_map=champion[0]["test_map"])
    vocabulary = build_vocabulary(r["labels"] for r in raw.fold(ledger).values())
    champion_labels = registry.card(version)["labels"]
    if vocabulary == champion_labels:
        out.update(init_from=version, reason=f"fine-tuning from champion v{version} (label vocabulary unchanged)")
    else:
        added = sorted(set(vocabulary) - set(champion_labels))
        out["reason"] = (f"training from scratch: new label(s) {added}" if added
                         else f"training from scratch: champion v{version} has another label vocabulary")
    return out


def commit_message(plan_: dict, result: dict | None) -> str:
    parts = [f"+{plan_['added']} images"]
    if plan_["relabelled"]:
        parts.append(f"{plan_['relabelled']} relabelled")
    if plan_["new_labels"]:
        parts.append(f"{len(plan_['new_labels'])} new label{'s' if len(plan_['new_labels']) > 1 else ''}")
    if result is None:
        return f"retrain: {', '.join(parts)} (not trained: {plan_['reason']})"
    before = f"{plan_['champion_map']:.3f}" if plan_["champion_map"] is not None else "none"
    verdict = "promoted" if result["champion"] else "not promoted"
    return f"retrain: {', '.join(parts)}, mAP {before} → {result['test_map']:.3f} (v{result['version']} {verdict})"


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
