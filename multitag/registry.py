"""Model registry in the artifact store: numbered versions and the ``champion`` alias. Plain store
operations (no torch): the register stage (multitag/champion.py) computes what goes in.

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
import math
import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from multitag.errors import NotFound, PreconditionFailed, StoreError
from multitag.report import markdown_table, utc_now
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
    champion_map: float | None = None   # the champion's test mAP in the comparison (on this test set)
    compared_map: float | None = None   # this version's test mAP in the comparison (on the labels compared)


@dataclass(frozen=True)
class Comparison:
    """How a candidate and the champion were compared: on the same test images and labels, or not at all."""
    champion: int
    comparable: bool
    candidate_map: float | None = None
    champion_map: float | None = None
    note: str = ""          # how they were compared (e.g. ", champion re-scored on this test set"), or why not
    buckets: dict | None = None  # head / medium / tail: [this version's mAP, the champion's]


def compare_as_recorded(candidate: dict, champion: dict) -> Comparison:
    """The comparison that needs no model: both tested on the same test set, with the same labels."""
    v = champion["version"]
    if champion.get("labels") not in (None, candidate["labels"]):
        return Comparison(v, False, note=f"label vocabulary differs from champion v{v}'s and no re-scoring given")
    if champion.get("test_set") != candidate["test_set"]:
        return Comparison(v, False, note=f"test set differs from champion v{v}'s and no re-scoring given")
    return Comparison(v, True, candidate["metrics"]["test"]["map"], champion["test_map"])


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


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


def open_registry(params, workspace: str | Path = ".") -> "Registry":
    """The registry params.yaml names (``register.name`` in ``store.uri``; a relative local store is
    under ``workspace``)."""
    return Registry(open_store(params.store.uri, workspace), params.register.name)


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
        """A version number from 'champion', '7', 'v7' or 7; NotFound names what is missing, and a
        champion whose version record is gone is refused as damaged."""
        text = str(ref)
        if text.removeprefix("v").isdigit():
            version = int(text.removeprefix("v"))
            if not self.store.exists(self.version_key(version, "version.json")):
                raise NotFound(f"model {self.name!r} has no complete version {version}")
            return version
        alias = self.alias(text)
        if alias is None:
            raise NotFound(f"model {self.name!r} has no alias {text!r} (nothing registered yet?)")
        version = alias[0]["version"]
        if not self.store.exists(self.version_key(version, "version.json")):
            raise StoreError(f"model {self.name!r}: {text} v{version} is damaged: its version record "
                             f"{self.version_key(version, 'version.json')} is missing in {self.store.uri}; it is not "
                             f"served. Promote a complete version (`multitag models promote N --reason ...`)")
        return version

    def incomplete(self) -> list[int]:
        """Versions claimed and holding files but without a version record: a registration that died
        midway, or a record deleted since (reported by `multitag models list`)."""
        claimed = {int(m.group(1)) for k in self.store.list(f"{self.prefix}/versions/")
                   if (m := re.search(r"/versions/(\d{6})/card\.json$", k))}
        return sorted(claimed - {v["version"] for v in self.versions()})

    def alias(self, alias: str) -> tuple[dict, str] | None:
        try:
            data, etag = self.store.get_bytes(f"{self.prefix}/aliases/{alias}.json")
        except NotFound:
            return None
        return json.loads(data), etag

    def download_model(self, ref: str | int, dest: str | Path, file: str = "model.pt") -> tuple[int, dict]:
        """Copy a version's ``file`` (model.pt, model.onnx) to ``dest``, verifying its checksum;
        returns (version, card). NotFound if the version has no such file."""
        version = self.resolve(ref)
        card = self.card(version)
        if file not in card["files"]:
            raise NotFound(f"model {self.name} v{version} has no {file}")
        self.store.get_file(self.version_key(version, file), dest)
        if file_digest(dest) != card["files"][file]:
            raise ValueError(f"model {self.name} v{version}: {file} checksum mismatch (corrupt download?)")
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
                 compare: Callable[[dict, dict], Comparison] = compare_as_recorded,
                 weights_sha256: str | None = None) -> Registration:
        """Register ``files`` (must include model.pt) with ``card`` (must include labels,
        metrics.test.map and test_set), then move the champion alias if this version beats it by more
        than ``min_improvement`` in ``compare(card, champion record)``: on the same test images and
        labels (the register stage re-scores the champion when they differ). A version whose test mAP
        is not a number is never promoted. The comparison goes into the card. ``weights_sha256``
        identifies the weights (the same weights are registered once); by default, the model file's sha256."""
        digest = weights_sha256 or file_digest(files["model.pt"])
        for v in self.versions():
            if v["weights_sha256"] == digest:
                champ = self.alias(CHAMPION)
                is_champ = champ is not None and champ[0]["version"] == v["version"]
                log.info("weights already registered as %s v%d", self.name, v["version"])
                return Registration(v["version"], False, is_champ, champ[0]["version"] if champ else None,
                                    "same weights already registered")
        current = self.alias(CHAMPION)
        judged = (current[1], compare(card, current[0])) if current else None
        version = self._claim()
        card = {**card, "name": self.name, "version": version, "weights_sha256": digest,
                "comparison": asdict(judged[1]) if judged else None,
                "created_at": utc_now(),
                "files": {name: file_digest(path) for name, path in files.items()}}
        for name, path in files.items():
            self.store.put_file(self.version_key(version, name), path)
        self.store.put_bytes(self.version_key(version, "card.json"), json.dumps(card, indent=2).encode())
        self.store.put_bytes(self.version_key(version, "MODEL_CARD.md"), model_card_markdown(card).encode())
        record = {"version": version, "weights_sha256": digest, "created_at": card["created_at"],
                  "test_map": card["metrics"]["test"]["map"], "test_set": card.get("test_set"),
                  "labels": card["labels"]}
        self.store.put_bytes(self.version_key(version, "version.json"), json.dumps(record).encode())
        log.info("registered %s v%d", self.name, version)
        return self._maybe_promote(record, card, min_improvement, compare, judged)

    def _write_champion(self, current: tuple[dict, str] | None, record: dict, reason: str,
                        lineage: list[int]) -> dict:
        """Compare-and-swap the champion alias from ``current``; PreconditionFailed if it moved.
        Returns the alias record written."""
        alias = {**record, "reason": reason, "lineage": lineage,
                 "promoted_at": utc_now()}
        key = f"{self.prefix}/aliases/{CHAMPION}.json"
        if current is None:
            self.store.put_bytes(key, json.dumps(alias).encode(), if_none_match=True)
        else:
            self.store.put_bytes(key, json.dumps(alias).encode(), if_match=current[1])
        log.info("champion -> v%d (%s)", record["version"], reason)
        return alias

    def _maybe_promote(self, record: dict, card: dict, min_improvement: float, compare, judged) -> Registration:
        version = record["version"]
        while True:
            current = self.alias(CHAMPION)
            prev = current[0]["version"] if current else None
            if not _finite(record["test_map"]):
                return Registration(version, True, False, prev, f"test mAP is {record['test_map']} (no positive "
                                    "test images for any label?): a version without a test score is never promoted")
            if current is None:
                decision, reason, c = True, "first registered version", None
            else:
                c = judged[1] if judged and judged[0] == current[1] else compare(card, current[0])
                if not c.comparable:
                    return Registration(version, True, False, prev, c.note)
                if not (_finite(c.candidate_map) and _finite(c.champion_map)):
                    return Registration(version, True, False, prev, f"not compared: no test score on the labels "
                                        f"compared (this version {c.candidate_map}, champion v{prev} {c.champion_map})")
                decision = c.candidate_map > c.champion_map + min_improvement
                reason = (f"test mAP {c.candidate_map:.4f} vs champion v{prev} {c.champion_map:.4f}{c.note} "
                          f"(min improvement {min_improvement})")
            scores = (c.champion_map, c.candidate_map) if c else (None, None)
            if not decision:
                return Registration(version, True, False, prev, reason, *scores)
            lineage = (current[0].get("lineage", [prev]) if current else []) + [version]
            try:
                self._write_champion(current, record, reason, lineage)
            except PreconditionFailed:
                continue  # another registration moved the alias meanwhile: decide again against it
            return Registration(version, True, True, prev, reason, *scores)

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


FEW_TRAINING_IMAGES = 20  # a label with fewer training images is named among the model card's known limits


def model_card_markdown(card: dict) -> str:
    """MODEL_CARD.md of a registered version, after the Hugging Face Hub's model cards and "Model
    Cards for Model Reporting" (Mitchell et al.): what it was trained on, the recipe, the metrics
    overall and by label frequency, the weakest labels, the thresholds, the comparison with the
    champion, the lineage, intended use and known limits. Every number is the card's (card.json);
    what a card registered by other means lacks is left empty."""
    p = card.get("params", {})
    t, ingest = p.get("train", {}), p.get("ingest", {})
    labels = card.get("per_label") or [{"label": label} for label in card["labels"]]
    metrics = markdown_table(card["metrics"]["test"].items(), ("metric", "value"))
    buckets = card["metrics"].get("buckets")
    if buckets:
        metrics += "\nBy label frequency in training (thirds of the labels: head, medium, tail):\n\n" + markdown_table(
            [(name, b["labels"], b["map"], b["micro_f1"], b["recall"]) for name, b in buckets.items()],
            ("labels", "count", "mAP", "micro-F1", "recall"))
    comparison = card.get("comparison")
    if comparison and comparison.get("comparable"):
        compared = (f"test mAP {comparison['candidate_map']:.4f} against champion v{comparison['champion']}'s "
                    f"{comparison['champion_map']:.4f}{comparison['note']}\n")
        if comparison.get("buckets"):
            compared += "\n" + markdown_table([(name, cand, champ) for name, (cand, champ) in comparison["buckets"].items()],
                                              ("labels", "this version mAP", "champion mAP"))
    else:
        compared = (comparison or {}).get("note") or "no champion to compare with: the first registered version\n"
    scored = sorted((r for r in labels if r.get("ap") not in (None, "")), key=lambda r: float(r["ap"]))
    weakest = markdown_table([(r["label"], r["ap"], r["f1"], r["support"], r["train_images"]) for r in scored[:10]],
                             ("label", "AP", "F1", "test images", "training images")) if scored else "no label has an AP\n"
    few = [r["label"] for r in labels if r.get("train_images") not in (None, "") and int(r["train_images"]) < FEW_TRAINING_IMAGES]
    vocabulary = markdown_table([(r["label"], r.get("train_images", ""), threshold)
                                 for r, threshold in zip(labels, card["thresholds"])],
                                ("label", "training images", "threshold (tuned on validation)"))
    recipe = markdown_table([("model", f"{t.get('model')} ({t.get('head', 'linear')} head)"),
                             ("pretrained", t.get("pretrained")), ("input size (px)", ingest.get("image_size")),
                             ("loss", t.get("loss")), ("epochs run", card.get("train", {}).get("epochs_run")),
                             ("time budget (s)", t.get("time_budget_s")), ("batch size", t.get("batch_size")),
                             ("learning rate", t.get("lr")), ("weight decay", t.get("weight_decay")),
                             ("schedule", t.get("schedule")), ("augmentation", t.get("augment", {}).get("preset")),
                             ("EMA decay", t.get("ema_decay")), ("seed", t.get("seed"))], ("setting", "value"))
    parent = p.get("lineage", {}).get("init_from")
    limits = [f"Scored on {card['metrics']['test'].get('images')} test images; thresholds tuned on "
              f"{card['metrics'].get('val', {}).get('images')} validation images."]
    if few:
        limits.append(f"{len(few)} label(s) had fewer than {FEW_TRAINING_IMAGES} training images, so their scores "
                      f"and thresholds are uncertain: {', '.join(few)}.")
    return (f"# {card['name']} v{card['version']}\n\n"
            f"A multi-label image classifier: one sigmoid output per label, {len(card['labels'])} labels, trained "
            f"by multitag. Created {card['created_at']}; weights sha256 {card['weights_sha256']}.\n\n"
            f"## Intended use\n\nTagging images like its training data (data version {card.get('data_version')}) with "
            "the labels below, each at its tuned threshold. Check it on your own images before relying on it for "
            "images of another kind (camera, domain, label definitions).\n\n"
            f"## Known limits\n\n" + "".join(f"- {line}\n" for line in limits) +
            f"\n## Training data\n\n- data version: {card.get('data_version')}\n"
            f"- images: " + ", ".join(f"{k} {v}" for k, v in (card.get("images") or {}).items()) + "\n"
            f"- labels ({len(card['labels'])}):\n\n{vocabulary}\n"
            f"## Recipe\n\n{recipe}\n## Test metrics\n\n{metrics}\n## Weakest labels\n\n{weakest}\n"
            f"## Compared with the champion\n\n{compared}\n"
            f"## Lineage\n\n- git commit: {card['git'].get('commit')} (dirty: {card['git'].get('dirty')})\n"
            f"- DVC hash of the raw data: {p.get('lineage', {}).get('raw')}\n"
            f"- fine-tuned from: {f'v{parent}' if parent else 'none (trained from the start)'}\n")
