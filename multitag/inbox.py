"""The retraining inbox and the raw data it feeds.

A batch is ``<retrain.inbox>/<name>/``: images, one annotations file in any supported format, and
``_READY.json``, written last (``multitag inbox add`` uploads the files first). Without the marker a
batch is still arriving and is left alone. The marker may carry reading options (``annotations``,
``format``, ``image_column``, ``tags_column``, ``delimiter``, ``no_label``, ``images``) and the list
of files with their SHA-256 (``files``), which is checked before the batch is read.

The raw data (``retrain.raw``, versioned with ``dvc add``) is append-only:

- ``images/<sha256><ext>``: every accepted image once, named by its content;
- ``batches.json``: the ledger, one entry per applied batch with its rows (image -> labels). It is
  written atomically and is the commit point: a batch in the ledger is never applied again;
- ``annotations.jsonl``: what the ingest stage reads, derived from the ledger (a later batch's labels
  for a known image replace the earlier ones).

Processed batches are moved to ``retrain.archive``, unusable ones to ``retrain.rejected``; both get
a ``_report.json`` saying what happened to each record. Inbox and areas are store URIs: a folder or
``s3://bucket/prefix``.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pydantic import ValidationError

from multitag.config import IngestParams, Params
from multitag.errors import IngestError, RecordError
from multitag.formats import read_records
from multitag.images import IMAGE_SUFFIXES, decode, sha256
from multitag.ingest import check_tags, image_bytes, images_root
from multitag.report import write_atomic
from multitag.storage import open_store

log = logging.getLogger(__name__)

READY = "_READY.json"
REPORT = "_report.json"
LEDGER = "batches.json"
ANNOTATIONS = "annotations.jsonl"
IMAGES = "images"
READ_OPTIONS = ("annotations", "format", "image_column", "tags_column", "delimiter", "no_label", "images")
ANNOTATION_SUFFIXES = (".csv", ".tsv", ".txt", ".jsonl", ".ndjson", ".json")


class BatchRejected(Exception):
    """The batch as a whole is unusable; ``rejected`` lists its records' problems, if any."""

    def __init__(self, reason: str, rejected: list[dict] | None = None):
        super().__init__(reason)
        self.rejected = rejected or []


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def find_annotations(folder: Path) -> str:
    """The batch's annotations, relative to ``folder``: "." for a Pascal VOC layout, else its one
    annotations file."""
    if (folder / "Annotations").is_dir() or (folder / "ImageSets" / "Main").is_dir():
        return "."
    found = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(("_", "."))
                   and p.suffix.lower() in ANNOTATION_SUFFIXES)
    if len(found) != 1:
        raise BatchRejected(f"expected one annotations file ({', '.join(ANNOTATION_SUFFIXES)}) at the top of the "
                            f"batch, found {found or 'none'}; name it with the 'annotations' option")
    return found[0]


@dataclass
class BatchContent:
    images: list[tuple[str, bytes, tuple[str, ...]]]  # (name in the batch, bytes, labels)
    rejected: list[dict] = field(default_factory=list)  # {record, image, reason}
    records: int = 0


def read_batch(folder: Path, options: dict, ingest: IngestParams) -> BatchContent:
    """Validate a batch in a local folder: every record's labels and image (decoded once).
    Raises BatchRejected when the batch as a whole is unusable."""
    listed = options.get("files") or {}
    missing = [f for f in listed if not (folder / f).is_file()]
    if missing:
        raise BatchRejected(f"incomplete: {len(missing)} file(s) listed in {READY} are missing, e.g. {missing[:3]}")
    ann = options.get("annotations") or find_annotations(folder)
    for key in ("annotations", "images"):
        value = str(options.get(key) or "")
        if value and (value.startswith("s3://") or not (folder / value).resolve().is_relative_to(folder.resolve())):
            raise BatchRejected(f"option {key}={value!r} leads outside the batch folder")
    try:
        p = IngestParams(**{**ingest.model_dump(), "format": "auto", "images": "",
                            **{k: v for k, v in options.items() if k in READ_OPTIONS}})
    except ValidationError as err:
        raise BatchRejected(f"invalid reading options in {READY}: "
                            + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())) from None
    p = p.model_copy(update={"annotations": str(folder / ann),
                             "images": str(folder / p.images) if p.images else ""})

    def plain(msg: str) -> str:  # messages name the batch's own paths, not the temporary folder
        return msg.replace(str(folder) + "/", "").replace(str(folder), ".")

    try:
        fmt, records = read_records(p)
    except IngestError as err:
        raise BatchRejected(f"annotations unreadable: {plain(str(err))}") from None
    root = images_root(p, fmt)
    content = BatchContent([], [], len(records))
    for r in records:
        try:
            tags = check_tags(r, fmt, p)
            if r.image.startswith("s3://"):
                raise RecordError(f"image {r.image!r} is outside the batch: a batch carries its own images")
            data = image_bytes(root, r.image)
            decode(data, 8, r.image)  # a readable image, or RecordError
            content.images.append((r.image, data, tags))
        except RecordError as err:
            content.rejected.append({"record": r.ref, "image": r.image, "reason": plain(str(err))})
    if not content.images:
        raise BatchRejected(f"no usable image: all {len(records)} record(s) rejected", content.rejected)
    return content


class RawData:
    """The append-only raw data folder (see the module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def ledger(self) -> list[dict]:
        path = self.root / LEDGER
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else []

    @staticmethod
    def fold(ledger: list[dict]) -> dict[str, dict]:
        """Content hash -> {"image", "labels"}: the current labels of every image."""
        rows: dict[str, dict] = {}
        for entry in ledger:
            rows.update(entry["rows"])
        return rows

    def write_annotations(self, ledger: list[dict] | None = None) -> None:
        rows = self.fold(self.ledger() if ledger is None else ledger)
        write_atomic(self.root / ANNOTATIONS,
                     "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows.values()).encode())

    def apply(self, name: str, fingerprint: str, content: BatchContent, source: str) -> dict:
        """Append a validated batch: copy its new images, then commit its ledger entry. Returns the entry."""
        ledger = self.ledger()
        current = self.fold(ledger)
        known_labels = {t for r in current.values() for t in r["labels"]}
        rows: dict[str, dict] = {}
        added, duplicates, relabelled = 0, 0, []
        for image, data, tags in content.images:
            digest = sha256(data)
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
                write_atomic(dest, data)
            rows[digest] = row
        entry = {"batch": name, "fingerprint": fingerprint, "source": source, "applied": _now(),
                 "records": content.records, "added": added, "relabelled": relabelled, "duplicates": duplicates,
                 "rejected": content.rejected,
                 "new_labels": sorted({t for r in rows.values() for t in r["labels"]} - known_labels),
                 "rows": rows}
        ledger.append(entry)
        write_atomic(self.root / LEDGER, (json.dumps(ledger, indent=1, ensure_ascii=False) + "\n").encode())
        self.write_annotations(ledger)
        log.info("batch %s: %d new image(s), %d relabelled, %d duplicate(s), %d record(s) rejected",
                 name, added, len(relabelled), duplicates, len(content.rejected))
        return entry


def summary(entry: dict) -> dict:
    """A ledger entry without its rows (for reports)."""
    return {k: v for k, v in entry.items() if k != "rows"}


class Inbox:
    """The inbox, archive and rejected areas of ``retrain`` params, each a store (folder or S3)."""

    def __init__(self, params: Params, workspace: str | Path = "."):
        p = params.retrain
        self.incoming, self.archive, self.rejected = (open_store(u, workspace) for u in (p.inbox, p.archive, p.rejected))

    def batches(self) -> dict[str, list[str]]:
        """Batch name -> its keys (relative to the batch), for everything in the inbox."""
        out: dict[str, list[str]] = {}
        for key in self.incoming.list():
            name, _, rest = key.partition("/")
            if rest:
                out.setdefault(name, []).append(rest)
        return out

    def ready(self) -> list[str]:
        return sorted(name for name, keys in self.batches().items() if READY in keys)

    def marker(self, name: str) -> tuple[dict, str]:
        """(options, fingerprint) of a ready batch; a marker that is not a JSON object means defaults."""
        data, _ = self.incoming.get_bytes(f"{name}/{READY}")
        try:
            options = json.loads(data) if data.strip() else {}
        except ValueError:
            options = None
        if not isinstance(options, dict):
            raise BatchRejected(f"{READY} is not a JSON object")
        return options, sha256(data)

    def download(self, name: str, dest: Path) -> None:
        for key in self.batches().get(name, []):
            if key not in (READY, REPORT):
                target = dest / key
                target.parent.mkdir(parents=True, exist_ok=True)
                self.incoming.get_file(f"{name}/{key}", target)

    def finish(self, name: str, area, report: dict) -> None:
        """Move batch ``name`` to ``area`` (archive or rejected): copy, write the report, then delete
        from the inbox, marker first. Safe to repeat after a crash at any point (a report in the
        area means the copy was complete)."""
        keys = self.batches().get(name, [])
        if not area.exists(f"{name}/{REPORT}"):
            with tempfile.TemporaryDirectory() as tmp:
                for key in keys:
                    if key != REPORT:
                        self.incoming.get_file(f"{name}/{key}", Path(tmp) / "f")
                        area.put_file(f"{name}/{key}", Path(tmp) / "f")
            area.put_bytes(f"{name}/{REPORT}", json.dumps(report, indent=1, ensure_ascii=False).encode())
        for key in sorted(keys, key=lambda k: k != READY):
            self.incoming.delete(f"{name}/{key}")

    def add(self, folder: Path, ingest: IngestParams, options: dict, name: str | None = None) -> tuple[str, BatchContent]:
        """Validate a local folder as a batch and upload it; ``_READY.json`` goes last."""
        if not folder.is_dir():
            raise FileNotFoundError(f"not a folder: {folder}")
        options = {k: v for k, v in options.items() if v is not None}
        if "annotations" not in options:
            options["annotations"] = find_annotations(folder)
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")
                       and p.name not in (READY, REPORT))
        content = read_batch(folder, options, ingest)
        name = name or f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', folder.resolve().name)}"
        if name in self.batches() or any(a.exists(f"{name}/{REPORT}") for a in (self.archive, self.rejected)):
            raise FileExistsError(f"a batch named {name!r} already exists (inbox, archive or rejected); "
                                  "choose another name")
        options["files"] = {}
        for f in files:
            rel = f.relative_to(folder).as_posix()
            self.incoming.put_file(f"{name}/{rel}", f)
            options["files"][rel] = sha256(f.read_bytes())
        options["added"] = _now()
        self.incoming.put_bytes(f"{name}/{READY}", json.dumps(options, indent=1, ensure_ascii=False).encode())
        return name, content

