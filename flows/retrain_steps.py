"""The retrain flow's steps, plain Python (flows/retrain.py runs them as Prefect tasks around the
training pipeline): one retrain at a time per workspace, the plan (train now or not, from what), the
record of which batches a finished training saw, and the git commit of what a retrain recorded."""

from __future__ import annotations

import fcntl
import logging
import subprocess
from contextlib import contextmanager
from pathlib import Path

import yaml

from multitag.config import Params
from multitag.layout import ORIGIN, Layout
from multitag.rawdata import RawData
from multitag.registry import CHAMPION, open_registry
from multitag.report import read_json, write_json

log = logging.getLogger(__name__)


def dvc_hash(dvc_file: Path) -> str | None:
    """The md5 DVC recorded for what a .dvc file tracks."""
    if not dvc_file.exists():
        return None
    outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or [{}]
    return outs[0].get("md5")


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
    path = layout.retrain_state
    return {"trained": [], **(read_json(path) if path.exists() else {})}


def save_state(layout: Layout, state: dict) -> None:
    write_json(layout.retrain_state, state)


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
    registry = open_registry(params, layout.root)
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
    before = result.get("champion_map")
    after = result["compared_map"] if before is not None and result.get("compared_map") is not None else result["test_map"]
    shown = score_pair(before, after) if before is not None else ("none", f"{after:.4f}")
    verdict = "promoted" if result["champion"] else "not promoted"
    return f"retrain: {', '.join(parts)}, mAP {shown[0]} → {shown[1]} (v{result['version']} {verdict})"


def score_pair(a: float, b: float) -> tuple[str, str]:
    """Two scores with enough decimals (4 at least, up to 6) to show that they differ when they do:
    0.9998 → 1.0000 rather than 1.000 → 1.000."""
    for digits in (4, 5, 6):
        if f"{a:.{digits}f}" != f"{b:.{digits}f}":
            break
    return f"{a:.{digits}f}", f"{b:.{digits}f}"


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
