"""The retraining inbox: batches of new annotated images, validated and applied to the raw data.

A batch is ``<retrain.inbox>/<name>/``: images, one annotations file in any supported format, and
``_READY.json``, written last (``multitag inbox add`` uploads the files first). Without the marker a
batch is still arriving and is left alone. The marker is a JSON object; any tool can write it:

    {"annotations": "labels.csv",           # the annotations file in the batch (default: the only one)
     "images": "images",                    # folder in the batch that image paths are relative to
                                            #   (default: the annotations' folder, or images/ when the
                                            #   names are found there)
     "format": "auto", "image_column": "image_name", "tags_column": "tags", "delimiter": " ",
     "no_label": null,                      # reading options, as in params.yaml's ingest section
     "files": {"labels.csv": "<sha256>", "images/a.jpg": "<sha256>", ...}}   # checked before reading

Every key is optional (``{}`` reads the batch with params.yaml's options). Processed batches are moved
to ``retrain.archive``, unusable ones to ``retrain.rejected``; both get a ``_report.json`` saying what
happened to each record. Inbox and areas are store URIs: a folder or ``s3://bucket/prefix``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Callable

from pydantic import ValidationError

from multitag.config import IngestParams, Params
from multitag.errors import BatchRejected, IngestError, RecordError
from multitag.formats import check_tags, images_root, read_records
from multitag.images import decode, image_bytes, sha256
from multitag.layout import ORIGIN, Layout
from multitag.lineage import origin_of
from multitag.rawdata import RawData, summary
from multitag.report import read_csv_rows, utc_now, write_csv
from multitag.storage import open_store

log = logging.getLogger(__name__)

READY = "_READY.json"
REPORT = "_report.json"
READ_OPTIONS = ("annotations", "format", "image_column", "tags_column", "delimiter", "no_label", "images")
ANNOTATION_SUFFIXES = (".csv", ".jsonl", ".ndjson", ".json")  # what ingest reads (CSV with any delimiter)
IMAGE_FOLDER = "images"  # a batch's image subfolder, found without being named


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
    images: list[tuple[str, str, tuple[str, ...]]]  # (image as written, sha256, labels)
    read: Callable[[str], bytes]                     # an image's bytes, by the name it was written with
    rejected: list[dict] = field(default_factory=list)  # {record, image, reason}
    records: int = 0


def read_content(p: IngestParams, inside: Path | None = None, plain: Callable[[str], str] = str) -> BatchContent:
    """Validate a data set's records: labels and images (each decoded once, small). With ``inside``,
    images must lie in that folder (a batch carries its own images). ``plain`` rewrites messages."""
    try:
        fmt, records = read_records(p)
    except IngestError as err:
        raise BatchRejected(f"annotations unreadable: {plain(str(err))}") from None
    root = images_root(p, fmt)

    def read(name: str) -> bytes:
        if inside is not None and name.startswith("s3://"):
            raise RecordError(f"image {name!r} is outside the batch: a batch carries its own images")
        return image_bytes(root, name)

    content = BatchContent([], read, [], len(records))
    for r in records:
        try:
            tags = check_tags(r, fmt, p)
            data = read(r.image)
            decode(data, 8, r.image)  # a readable image, or RecordError
            content.images.append((r.image, sha256(data), tags))
        except RecordError as err:
            content.rejected.append({"record": r.ref, "image": r.image, "reason": plain(str(err))})
    if not content.images:
        first = "; ".join(f"{r['record']} {r['image']}: {r['reason']}" for r in content.rejected[:3])
        raise BatchRejected(f"no usable image: all {len(records)} record(s) rejected; first: {first}", content.rejected)
    return content


def _image_folder(folder: Path, p: IngestParams) -> str:
    """Where a batch's image paths point: its top folder, or its images/ subfolder when more of the
    annotated names are found there (the layout of a data set with labels.csv beside images/)."""
    if not (folder / IMAGE_FOLDER).is_dir():
        return ""
    try:
        _, records = read_records(p)
    except IngestError:
        return ""
    names = [r.image for r in records if r.image and not r.image.startswith(("/", "s3://"))]

    def found(base: Path) -> int:
        return sum(any((base / n).with_suffix(s).is_file() or (base / n).is_file() for s in ("", ".jpg", ".png"))
                   for n in names)
    return IMAGE_FOLDER if found(folder / IMAGE_FOLDER) > found(folder) else ""


BATCH_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def listed_files(options: dict) -> dict[str, str]:
    """The marker's ``files`` (name -> sha256), every name checked to stay inside the batch before
    anything is looked up."""
    listed = options.get("files") or {}
    if not isinstance(listed, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in listed.items()):
        raise BatchRejected(f"'files' in {READY} must map each file's path in the batch to its sha256")
    for name in listed:
        parts = PurePosixPath(name).parts
        if not name or name.startswith("/") or "\\" in name or "\x00" in name or ".." in parts or not parts:
            raise BatchRejected(f"{READY} lists {name!r}, which is not a path inside the batch: refused")
    return listed


def read_batch(folder: Path, options: dict, ingest: IngestParams) -> BatchContent:
    """Validate a batch in a local folder: every file its marker lists present with the sha256 the
    marker gives. Raises BatchRejected when the batch as a whole is unusable."""
    listed = listed_files(options)
    missing = [f for f in listed if not (folder / f).is_file()]
    if missing:
        raise BatchRejected(f"incomplete: {len(missing)} file(s) listed in {READY} are missing, e.g. {missing[:3]}")
    for name, digest in listed.items():
        actual = sha256((folder / name).read_bytes())
        if actual != digest:
            raise BatchRejected(f"{name} does not match its sha256 in {READY} ({actual[:12]}... instead of "
                                f"{digest[:12]}...): changed after the batch was marked ready")
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
    p = p.model_copy(update={"annotations": str(folder / ann), "images": str(folder / p.images) if p.images else ""})
    if "images" not in options:
        found = _image_folder(folder, p)
        p = p.model_copy(update={"images": str(folder / found) if found else ""})

    def plain(msg: str) -> str:  # messages name the batch's own paths, not the temporary folder
        return msg.replace(str(folder) + "/", "").replace(str(folder), ".")

    return read_content(p, inside=folder, plain=plain)


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
        """(options, fingerprint) of a ready batch; an empty marker means defaults."""
        data, _ = self.incoming.get_bytes(f"{name}/{READY}")
        try:
            options = json.loads(data) if data.strip() else {}
        except ValueError:
            options = None
        if not isinstance(options, dict):
            raise BatchRejected(f"{READY} is not a JSON object")
        return options, sha256(data)

    def download(self, name: str, dest: Path, only: dict | None = None) -> None:
        """Copy batch ``name`` to ``dest``: only the files ``only`` lists (its marker's), when given."""
        for key in self.batches().get(name, []):
            if key not in (READY, REPORT) and (not only or key in only):
                target = dest / key
                target.parent.mkdir(parents=True, exist_ok=True)
                self.incoming.get_file(f"{name}/{key}", target)

    def finish(self, name: str, area, report: dict) -> None:
        """Move batch ``name`` to ``area`` (archive or rejected): copy, write the report, then delete
        from the inbox, marker first. Safe to repeat after a crash at any point (a report in the
        area means the copy was complete)."""
        keys = self.batches().get(name, [])
        links = self.incoming.links(f"{name}/")  # removed, never followed
        if not area.exists(f"{name}/{REPORT}"):
            with tempfile.TemporaryDirectory() as tmp:
                for key in keys:
                    if key != REPORT:
                        self.incoming.get_file(f"{name}/{key}", Path(tmp) / "f")
                        area.put_file(f"{name}/{key}", Path(tmp) / "f")
            area.put_bytes(f"{name}/{REPORT}", json.dumps(report, indent=1, ensure_ascii=False).encode())
        for key in sorted(keys, key=lambda k: k != READY):
            self.incoming.delete(f"{name}/{key}")
        for link in links:
            self.incoming.delete(link)

    def add(self, folder: Path, ingest: IngestParams, options: dict, name: str | None = None) -> tuple[str, BatchContent]:
        """Validate a local folder as a batch and upload it; ``_READY.json`` goes last."""
        if not folder.is_dir():
            raise FileNotFoundError(f"not a folder: {folder}")
        if name is not None and not BATCH_NAME.match(name):
            raise BatchRejected(f"batch name {name!r} refused: use letters, digits, '_', '.' and '-' (no '/'), "
                                "starting with a letter or digit")
        links = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_symlink())
        if links:
            raise BatchRejected(f"the folder holds symbolic links ({', '.join(links[:5])}): a batch carries its own "
                                "files; copy them in instead")
        options = {k: v for k, v in options.items() if v is not None}
        if "annotations" not in options:
            options["annotations"] = find_annotations(folder)
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")
                       and p.name not in (READY, REPORT))
        content = read_batch(folder, options, ingest)
        name = name or f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', folder.resolve().name)[:64]}"
        if name in self.batches() or any(a.exists(f"{name}/{REPORT}") for a in (self.archive, self.rejected)):
            raise FileExistsError(f"a batch named {name!r} already exists (inbox, archive or rejected); "
                                  "choose another name")
        options["files"] = {}
        for f in files:
            rel = f.relative_to(folder).as_posix()
            self.incoming.put_file(f"{name}/{rel}", f)
            options["files"][rel] = sha256(f.read_bytes())
        options["added"] = utc_now()
        self.incoming.put_bytes(f"{name}/{READY}", json.dumps(options, indent=1, ensure_ascii=False).encode())
        return name, content


def _in_workspace(p: IngestParams, root: Path) -> IngestParams:
    """``p`` with its relative paths made relative to the workspace (a flow may run elsewhere)."""
    def place(value: str) -> str:
        return value if not value or value.startswith("s3://") or Path(value).is_absolute() else str(root / value)
    return p.model_copy(update={"annotations": place(p.annotations), "images": place(p.images)})


def take_in(params: Params, layout: Layout) -> dict:
    """Apply every complete batch not applied yet to the raw data, move it to the archive (or, if
    unusable, to the rejected area with its report); finish moves that a stopped run left undone.
    When retraining begins (the first ready batch, no raw data yet), the data set params.yaml's
    ingest reads is applied first, as batch ``origin``: retraining only ever adds to it."""
    raw = RawData(layout.root / params.retrain.raw)
    inbox = Inbox(params, layout.root)
    ledger = {e["batch"]: e for e in raw.ledger()}
    applied, rejected = [], []
    ready = [name for name in inbox.ready() if name not in ledger]
    if ready and not ledger and params.lineage.raw is None:
        origin = _in_workspace(params.ingest, layout.root)
        if origin.annotations.startswith("s3://") or Path(origin.annotations).exists():
            try:
                content = read_content(origin)
            except BatchRejected as err:
                raise BatchRejected(f"the data set ingest reads ({params.ingest.annotations}) cannot start the raw "
                                    f"data: {err}") from None
            fingerprint = hashlib.sha256(json.dumps(origin_of(params.ingest)).encode()).hexdigest()
            ledger[ORIGIN] = raw.apply(ORIGIN, fingerprint, content, params.ingest.annotations)
            applied.append(summary(ledger[ORIGIN]))
        else:
            log.warning("ingest.annotations (%s) does not exist: retraining starts from the inbox batches alone",
                        params.ingest.annotations)
    for name in ready:
        try:
            links = inbox.incoming.links(f"{name}/")
            if links:
                raise BatchRejected(f"the batch holds symbolic links ({', '.join(k.partition('/')[2] for k in links[:5])}):"
                                    " a batch carries its own files; nothing they point at was read or copied")
            options, fingerprint = inbox.marker(name)
            with tempfile.TemporaryDirectory() as tmp:
                inbox.download(name, Path(tmp), listed_files(options))
                entry = raw.apply(name, fingerprint, read_batch(Path(tmp), options, params.ingest),
                                  inbox.incoming.url(name))
        except BatchRejected as err:
            report = {"batch": name, "rejected_at": utc_now(), "reason": str(err), "rejected_records": err.rejected}
            log.warning("batch %s rejected: %s", name, err)
            inbox.finish(name, inbox.rejected, report)
            rejected.append(report)
            continue
        ledger[name] = entry
        applied.append(summary(entry))
    for name in inbox.batches():
        if name in ledger:
            inbox.finish(name, inbox.archive, summary(ledger[name]))
        elif inbox.rejected.exists(f"{name}/{REPORT}"):
            inbox.finish(name, inbox.rejected, {})  # already copied there: only the deletion was left
    return {"applied": applied, "rejected": rejected, "batches": list(ledger)}


ACCEPTED = {"y", "yes", "1", "true", "x", "ok"}  # an accept cell of reports/label_issues.csv


def review_batch(layout: Layout, images_root: str, dest: Path) -> int:
    """Write the rows of reports/label_issues.csv a person accepted (``accept``: yes) as a batch
    folder for `multitag inbox add`: the images and a labels.csv with their ``suggested`` labels
    (edit that column to correct it). Returns the number of images."""
    if not layout.label_issues.exists():
        raise FileNotFoundError(f"{layout.label_issues} not found: run the review stage first (review.enabled: true)")
    rows = read_csv_rows(layout.label_issues)
    missing = [c for c in ("image", "sha256", "suggested", "accept") if rows and c not in rows[0]]
    if missing:
        raise ValueError(f"{layout.label_issues}: no column {missing} (it has {list(rows[0])}); a spreadsheet may have "
                         "saved it with another delimiter: save it comma-separated")
    accepted = [r for r in rows if (r["accept"] or "").strip().lower() in ACCEPTED]
    if not accepted:
        raise ValueError(f"no row of {layout.label_issues} is accepted: write yes in the accept column of the rows "
                         "whose suggested labels are right (edit suggested to correct them)")
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest} is not empty: choose a new folder for the batch")
    files = {}  # every image is checked before anything is written
    for r in accepted:
        data = image_bytes(images_root, r["image"])
        if hashlib.sha256(data).hexdigest() != r["sha256"]:
            raise ValueError(f"{r['image']} changed since the review (its content hash differs): review again")
        files[f"{r['sha256'][:16]}{Path(r['image']).suffix.lower()}"] = (data, r["suggested"])
    (dest / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for name, (data, suggested) in files.items():
        (dest / "images" / name).write_bytes(data)
        rows.append((name, suggested))
    write_csv(dest / "labels.csv", ["image_name", "tags"], rows)
    return len(rows)
