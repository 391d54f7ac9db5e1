"""Model registry in the artifact store: numbered versions and the ``champion`` alias; and the
register stage, which puts the evaluated model into it and applies the champion rule.

Layout under ``registry/<name>/``::

    versions/000007.claim          claimed with a create-if-absent write: no two writers share a number
    versions/000007/model.pt       files first ...
    versions/000007/card.json
    versions/000007/MODEL_CARD.md
    versions/000007/version.json   ... the version record last: only then is the version complete
    aliases/champion.json          moved by compare-and-swap (write only if unchanged since read)

Registering weights already registered returns the existing version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from multitag.config import Params
from multitag.errors import NotFound, PreconditionFailed
from multitag.layout import Layout, load_split, read_manifest, select_device
from multitag.metrics import mean_ap
from multitag.models import load_model_file, predict_scores, state_digest
from multitag.report import markdown_table, read_json, write_json
from multitag.storage import Store, open_store

log = logging.getLogger(__name__)

CHAMPION = "champion"


@dataclass(frozen=True)
class Registration:
    version: int
    created: bool          # False: the same weights were already registered
    champion: bool         # this version is the champion after the call
    previous_champion: int | None
    reason: str


def weights_digest(model_file: str | Path) -> str:
    """sha256 over the tensors of a model file (independent of how torch.save laid out the zip)."""
    return state_digest(torch.load(model_file, map_location="cpu", weights_only=True)["state_dict"])


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def git_commit(workspace: str | Path = ".") -> dict:
    """The workspace's commit and whether it has uncommitted changes (None outside git)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=workspace, capture_output=True, text=True, timeout=30)
    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(git("status", "--porcelain").stdout.strip())}


class Registry:
    def __init__(self, store: Store, name: str):
        self.store, self.name = store, name
        self.prefix = f"registry/{name}"

    def version_key(self, version: int, file: str = "") -> str:
        return f"{self.prefix}/versions/{version:06d}" + (f"/{file}" if file else "")

    def versions(self) -> list[dict]:
        """Complete versions (those with a version record), oldest first."""
        out = []
        for key in self.store.list(f"{self.prefix}/versions/"):
            if re.fullmatch(rf"{re.escape(self.prefix)}/versions/\d{{6}}/version\.json", key):
                out.append(json.loads(self.store.get_bytes(key)[0]))
        return sorted(out, key=lambda v: v["version"])

    def card(self, version: int) -> dict:
        return json.loads(self.store.get_bytes(self.version_key(version, "card.json"))[0])

    def resolve(self, ref: str | int) -> int:
        """A version number from 'champion', '7' or 7; NotFound names what is missing."""
        if str(ref).isdigit():
            version = int(ref)
            if not self.store.exists(self.version_key(version, "version.json")):
                raise NotFound(f"model {self.name!r} has no complete version {version}")
            return version
        alias = self.alias(str(ref))
        if alias is None:
            raise NotFound(f"model {self.name!r} has no alias {ref!r} (nothing registered yet?)")
        return alias[0]["version"]

    def alias(self, alias: str) -> tuple[dict, str] | None:
        try:
            data, etag = self.store.get_bytes(f"{self.prefix}/aliases/{alias}.json")
        except NotFound:
            return None
        return json.loads(data), etag

    def download_model(self, ref: str | int, dest: str | Path) -> tuple[int, dict]:
        """Copy a version's model.pt to ``dest``, verifying its checksum; returns (version, card)."""
        version = self.resolve(ref)
        card = self.card(version)
        self.store.get_file(self.version_key(version, "model.pt"), dest)
        if file_digest(dest) != card["files"]["model.pt"]:
            raise ValueError(f"model {self.name} v{version}: model.pt checksum mismatch (corrupt download?)")
        return version, card

    def _claim(self) -> int:
        claimed = [int(m.group(1)) for k in self.store.list(f"{self.prefix}/versions/")
                   if (m := re.search(r"/versions/(\d{6})\.claim$", k))]
        version = max(claimed, default=0) + 1
        while True:
            try:
                self.store.put_bytes(self.version_key(version) + ".claim", b"", if_none_match=True)
                return version
            except PreconditionFailed:
                version += 1

    def register(self, files: dict[str, str | Path], card: dict, min_improvement: float = 0.0,
                 rescore: Callable[[int], float] | None = None) -> Registration:
        """Register ``files`` (must include model.pt) with ``card`` (must include metrics.test.map
        and test_set), then move the champion alias if this version beats it by more than
        ``min_improvement`` on the same test set. When the champion was tested on another test set,
        ``rescore(version)`` gives its mAP on this one."""
        digest = weights_digest(files["model.pt"])
        for v in self.versions():
            if v["weights_sha256"] == digest:
                champ = self.alias(CHAMPION)
                is_champ = champ is not None and champ[0]["version"] == v["version"]
                log.info("weights already registered as %s v%d", self.name, v["version"])
                return Registration(v["version"], False, is_champ, champ[0]["version"] if champ else None,
                                    "same weights already registered")
        version = self._claim()
        card = {**card, "name": self.name, "version": version, "weights_sha256": digest,
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "files": {name: file_digest(path) for name, path in files.items()}}
        for name, path in files.items():
            self.store.put_file(self.version_key(version, name), path)
        self.store.put_bytes(self.version_key(version, "card.json"), json.dumps(card, indent=2).encode())
        self.store.put_bytes(self.version_key(version, "MODEL_CARD.md"), model_card_markdown(card).encode())
        record = {"version": version, "weights_sha256": digest, "created_at": card["created_at"],
                  "test_map": card["metrics"]["test"]["map"], "test_set": card.get("test_set")}
        self.store.put_bytes(self.version_key(version, "version.json"), json.dumps(record).encode())
        log.info("registered %s v%d", self.name, version)
        return self._maybe_promote(record, min_improvement, rescore)

    def _write_champion(self, current: tuple[dict, str] | None, record: dict, reason: str,
                        lineage: list[int]) -> dict:
        """Compare-and-swap the champion alias from ``current``; PreconditionFailed if it moved.
        Returns the alias record written."""
        alias = {**record, "reason": reason, "lineage": lineage,
                 "promoted_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        key = f"{self.prefix}/aliases/{CHAMPION}.json"
        if current is None:
            self.store.put_bytes(key, json.dumps(alias).encode(), if_none_match=True)
        else:
            self.store.put_bytes(key, json.dumps(alias).encode(), if_match=current[1])
        log.info("champion -> v%d (%s)", record["version"], reason)
        return alias

    def _maybe_promote(self, record: dict, min_improvement: float, rescore) -> Registration:
        version = record["version"]
        while True:
            current = self.alias(CHAMPION)
            if current is None:
                decision, reason, prev = True, "first registered version", None
            else:
                champ, etag = current
                prev = champ["version"]
                champ_map, note = champ["test_map"], ""
                if champ.get("test_set") != record["test_set"]:
                    if rescore is None:
                        return Registration(version, True, False, prev,
                                            "test set differs from the champion's and no re-scoring given")
                    champ_map, note = rescore(prev), ", champion re-scored on this test set"
                decision = record["test_map"] > champ_map + min_improvement
                reason = (f"test mAP {record['test_map']:.4f} vs champion v{prev} {champ_map:.4f}{note} "
                          f"(min improvement {min_improvement})")
            if not decision:
                return Registration(version, True, False, prev, reason)
            lineage = (current[0].get("lineage", [prev]) if current else []) + [version]
            try:
                self._write_champion(current, record, reason, lineage)
            except PreconditionFailed:
                continue  # another registration moved the alias meanwhile: decide again against it
            return Registration(version, True, True, prev, reason)

    def _version_record(self, version: int) -> dict:
        return json.loads(self.store.get_bytes(self.version_key(version, "version.json"))[0])

    def _move_champion(self, choose) -> dict:
        """Move the alias to choose(current) = (version record, reason, lineage), choosing again
        if another writer moved it meanwhile. Returns the alias record written."""
        while True:
            current = self.alias(CHAMPION)
            record, reason, lineage = choose(current)
            try:
                return self._write_champion(current, record, reason, lineage)
            except PreconditionFailed:
                continue

    def promote(self, version: int, reason: str) -> dict:
        """Make ``version`` the champion whatever its metrics (a person's decision, with its reason)."""
        record = self._version_record(self.resolve(version))
        return self._move_champion(lambda current: (
            record, f"promoted by hand: {reason}",
            (current[0].get("lineage", []) if current else []) + [record["version"]]))

    def rollback(self, reason: str = "rollback") -> dict:
        """Point the champion back at the one it replaced."""
        def choose(current):
            lineage = current[0].get("lineage", []) if current else []
            if len(lineage) < 2:
                raise NotFound(f"model {self.name!r}: no earlier champion to roll back to")
            return (self._version_record(lineage[-2]), f"rolled back from v{lineage[-1]}: {reason}",
                    lineage[:-1])
        return self._move_champion(choose)


def model_card_markdown(card: dict) -> str:
    metrics = markdown_table(card["metrics"]["test"].items(), ("metric", "value"))
    thresholds = markdown_table(zip(card["labels"], card["thresholds"]), ("label", "threshold"))
    return (f"# {card['name']} v{card['version']}\n\n"
            f"- created: {card['created_at']}\n- architecture: {card['params']['train']['model']}\n"
            f"- labels: {len(card['labels'])}\n- data version: {card.get('data_version')}\n"
            f"- git commit: {card['git'].get('commit')} (dirty: {card['git'].get('dirty')})\n"
            f"- weights sha256: {card['weights_sha256']}\n\n"
            f"## Test metrics\n\n{metrics}\n## Thresholds (tuned on validation)\n\n{thresholds}")


# What a registered version holds: the model and the reports of the run that made it.
ARTIFACTS = {"model.pt": "model", "thresholds.json": "thresholds", "metrics.json": "metrics",
             "per_label.csv": "per_label", "pr_curves.png": "pr_plot", "train_history.csv": "train_history",
             "ingest_issues.csv": "ingest_issues", "label_stats.json": "label_stats",
             "label_stats.png": "label_stats_plot"}  # file in the version -> Layout attribute


def test_set_digest(layout: Layout) -> str:
    """Identity of the test split: the sorted content hashes of its images."""
    m = read_manifest(layout, ["sha256", "split"])
    return hashlib.sha256("\n".join(sorted(m.loc[m["split"] == "test", "sha256"])).encode()).hexdigest()[:16]


def champion_rescorer(registry: Registry, layout: Layout, vocabulary: list[str]):
    """rescore(version) -> that version's test mAP on the current test split, over the labels it knows."""
    def rescore(version: int) -> float:
        x, y, _ = load_split(layout, "test")
        device = select_device("auto")
        model, meta = registered_model(registry, version, device)
        scores = predict_scores(model, x, device, tta=meta["tta"])
        common = [j for j, label in enumerate(meta["labels"]) if label in vocabulary]
        cols = [vocabulary.index(meta["labels"][j]) for j in common]
        return mean_ap(y.numpy()[:, cols], scores[:, common])
    return rescore


def register_model(params: Params, layout: Layout) -> dict:
    """Register models/model.pt with its metrics, thresholds, params, data and code version.
    Writes and returns reports/registration.json (the same for the same model and registry state:
    the store as configured, no timestamps)."""
    registry = Registry(open_store(params.store.uri, layout.root), params.register.name)
    metrics = read_json(layout.metrics)
    thresholds = read_json(layout.thresholds)
    ingest_summary = read_json(layout.ingest_summary)
    run_log = layout.run_log / "train.json"
    card = {
        "labels": thresholds["labels"], "thresholds": thresholds["thresholds"], "metrics": metrics,
        "params": params.dump(), "data_version": ingest_summary["data_version"],
        "images": ingest_summary["splits"], "test_set": test_set_digest(layout),
        "train": {**read_json(layout.train_summary), **(read_json(run_log) if run_log.exists() else {})},
        "git": git_commit(layout.root),
    }
    files = {name: getattr(layout, attr) for name, attr in ARTIFACTS.items()}
    rescore = champion_rescorer(registry, layout, thresholds["labels"])
    reg = registry.register(files, card, params.register.min_improvement, rescore)
    out = {"name": registry.name, "store": params.store.uri, **asdict(reg), "test_map": metrics["test"]["map"]}
    write_json(layout.registration, out)
    log.info("%s v%d %s; champion: %s (%s)", registry.name, reg.version,
             "registered" if reg.created else "already registered", reg.champion, reg.reason)
    return out


def registered_model(registry: Registry, version: int, device: torch.device | str = "cpu"):
    """(model, metadata) of a registered version, its checksum verified (for re-scoring a
    champion and for ``train.init_from``)."""
    with tempfile.TemporaryDirectory() as tmp:
        registry.download_model(version, Path(tmp) / "model.pt")
        return load_model_file(Path(tmp) / "model.pt", device)


def run(params: Params, layout: Layout) -> dict:
    """The register stage as dvc.yaml runs it."""
    return register_model(params, layout)
