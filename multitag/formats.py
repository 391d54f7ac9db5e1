"""Annotation formats -> one list of records (where in the file, image path, labels).

Supported (``ingest.format``; ``auto`` picks from the files present):

- ``tags_csv``: an image column and a column of labels joined by ``ingest.delimiter``
  (Kaggle Planet ``image_name,tags``; NIH ChestX-ray14 ``Image Index,Finding Labels`` with ``|`` and
  ``ingest.no_label: No Finding``).
- ``multihot_csv``: an image column and one 0/1 column per label.
- ``jsonl``: one object per line: ``{"image": ..., "labels": [...]}``; Vertex AI
  (``imageGcsUri``, ``classificationAnnotations[].displayName``) and Azure ML (``image_url``,
  ``label``) field names too.
- ``coco``: COCO instances JSON; labels = category names of each image's annotations, images
  without annotations kept as negatives.
- ``voc``: a Pascal VOC folder with ``Annotations/*.xml`` (object names) or, without it,
  ``ImageSets/Main/<label>_<split>.txt``.

File-level problems raise IngestError; record-level problems come back as records with an error.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pandas as pd

from multitag.config import IngestParams
from multitag.errors import IngestError, RecordError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Record:
    ref: str                  # where it is in the annotations ("line 5", "Annotations/x.xml")
    image: str                # image path as written (relative to the image folder)
    tags: tuple[str, ...] = ()
    error: str | None = None  # why the record itself is unusable


IMAGE_FIELDS = ("image", "imageGcsUri", "image_url", "path")
_BAD_TAG = re.compile(r"[\x00-\x1f\x7f,;|]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
UNFILLED = "?"  # the tag cell of an image still to be annotated (multitag suggest --batch writes it)


def detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / "Annotations").is_dir() or (path / "ImageSets" / "Main").is_dir():
            return "voc"
        raise IngestError(f"{path}: a folder, but not a Pascal VOC layout (no Annotations/ or ImageSets/Main/)")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".json":
        return "coco"
    return "csv"


CSV_CHUNK = 100_000  # rows per chunk: a 1M-row file is read in a bounded amount of memory


def _csv_chunks(path: Path) -> Iterator[pd.DataFrame]:
    """The CSV's rows in chunks of strings (nothing converted), header names trimmed."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            for chunk in pd.read_csv(f, dtype=str, keep_default_na=False, skipinitialspace=True, chunksize=CSV_CHUNK):
                chunk.columns = [c.strip() for c in chunk.columns]
                yield chunk
    except UnicodeDecodeError as err:
        raise IngestError(f"{path}: not UTF-8 text ({err.reason}); re-save the file as UTF-8") from None
    except pd.errors.EmptyDataError:
        raise IngestError(f"{path}: empty file, expected a header row") from None
    except pd.errors.ParserError as err:
        raise IngestError(f"{path}: not a readable CSV file ({err})") from None


def _need_columns(path: Path, df: pd.DataFrame, *columns: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise IngestError(f"{path}: missing column(s) {missing}; the file has {list(df.columns)} "
                          "(set ingest.image_column / ingest.tags_column)")


def _split_tags(value: str, p: IngestParams) -> tuple[str, ...]:
    tags = [t.strip() for t in value.split(p.delimiter)]
    return tuple(sys.intern(t) for t in tags if t and t != p.no_label)  # one string per label, not per row


def read_tags_csv(path: Path, p: IngestParams, df: pd.DataFrame, first_line: int = 2) -> list[Record]:
    _need_columns(path, df, p.image_column, p.tags_column)
    return [Record(f"line {first_line + i}", name.strip(), _split_tags(tags, p))
            for i, (name, tags) in enumerate(zip(df[p.image_column], df[p.tags_column]))]


def read_multihot_csv(path: Path, p: IngestParams, df: pd.DataFrame, first_line: int = 2) -> list[Record]:
    _need_columns(path, df, p.image_column)
    labels = [c for c in df.columns if c != p.image_column]
    if not labels:
        raise IngestError(f"{path}: no label columns beside {p.image_column!r}")
    records = []
    for i, row in enumerate(df.itertuples(index=False)):
        values = dict(zip(df.columns, row))
        bad = [(label, values[label]) for label in labels if values[label].strip() not in ("0", "1")]
        error = f"label column {bad[0][0]!r} holds {bad[0][1]!r}, expected 0 or 1" if bad else None
        records.append(Record(f"line {first_line + i}", values[p.image_column].strip(),
                              tuple(label for label in labels if values[label].strip() == "1"), error))
    return records


def read_csv_records(path: Path, p: IngestParams, fmt: str) -> tuple[str, list[Record]]:
    """Records of a tags or multi-hot CSV, read chunk by chunk with progress; ``fmt`` "csv" decides
    from the first chunk (multi-hot when there is no tags column and every other column is 0/1)."""
    records: list[Record] = []
    for chunk in _csv_chunks(path):
        if fmt == "csv":
            others = [c for c in chunk.columns if c != p.image_column]
            multihot = (p.tags_column not in chunk.columns and p.image_column in chunk.columns and others
                        and all(set(chunk[c].str.strip()) <= {"0", "1"} for c in others))
            fmt = "multihot_csv" if multihot else "tags_csv"
        read = read_tags_csv if fmt == "tags_csv" else read_multihot_csv
        records += read(path, p, chunk, first_line=len(records) + 2)
        if len(chunk) == CSV_CHUNK:
            log.info("annotations: %d rows read from %s", len(records), path)
    return ("tags_csv" if fmt == "csv" else fmt), records


def _json_labels(obj: dict) -> list:
    if "labels" in obj:
        return obj["labels"]
    if "classificationAnnotations" in obj:
        return [a["displayName"] for a in obj["classificationAnnotations"]]
    if "label" in obj:
        return obj["label"] if isinstance(obj["label"], list) else [obj["label"]]
    return []


def read_jsonl(path: Path, p: IngestParams) -> list[Record]:
    records = []
    for i, line in enumerate(_read_text(path).splitlines()):
        if not line.strip():
            continue
        ref = f"line {i + 1}"
        try:
            obj = json.loads(line)
            image = next(obj[f] for f in IMAGE_FIELDS if f in obj)
            labels = _json_labels(obj)
            if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
                raise TypeError("labels must be a list of strings")
            records.append(Record(ref, str(image).strip(), tuple(t.strip() for t in labels if t.strip())))
        except StopIteration:
            records.append(Record(ref, "", error=f"no image field (one of {list(IMAGE_FIELDS)})"))
        except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as err:
            records.append(Record(ref, "", error=f"malformed JSON record ({err})"))
    return records


def read_coco(path: Path, p: IngestParams) -> list[Record]:
    try:
        data = json.loads(_read_text(path))
        names = {c["id"]: c["name"] for c in data["categories"]}  # ids need not be contiguous
        images = {im["id"]: im["file_name"] for im in data["images"]}
        annotations = data.get("annotations", [])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise IngestError(f"{path}: not a COCO instances file ({err}); expected images, categories, "
                          "annotations") from None
    labels: dict[int, set[str]] = {i: set() for i in images}
    errors: dict[int, str] = {}
    orphans = []
    for k, a in enumerate(annotations):
        if not isinstance(a, dict) or a.get("image_id") not in images:  # nothing to attach it to: reported
            image_id = a.get("image_id") if isinstance(a, dict) else None
            orphans.append(Record(f"annotations[{k}]", "", error=f"annotation {k} refers to image_id {image_id!r}, "
                                                                 "which has no entry in images"))
        elif a.get("category_id") not in names:
            errors[a["image_id"]] = f"annotation {k} has unknown category_id {a.get('category_id')!r}"
        else:
            labels[a["image_id"]].add(names[a["category_id"]])
    return [Record(f"images[id={i}]", images[i], tuple(sorted(labels[i])), errors.get(i)) for i in images] + orphans


def read_voc_imagesets(root: Path, p: IngestParams) -> list[Record]:
    """``ImageSets/Main/<label>_<split>.txt`` lines ``<image id> <1|-1|0>`` (0 = difficult)."""
    labels: dict[str, set[str]] = {}
    for f in sorted((root / "ImageSets" / "Main").glob("*_*.txt")):
        label = f.stem.rsplit("_", 1)[0]
        for n, line in enumerate(_read_text(f).splitlines()):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or parts[1] not in ("1", "-1", "0"):
                raise IngestError(f"{f} line {n + 1}: expected '<image id> <1|-1|0>', got {line!r}")
            tags = labels.setdefault(parts[0], set())
            if parts[1] == "1" or (parts[1] == "0" and p.voc_difficult == "positive"):
                tags.add(label)
    return [Record(f"ImageSets/Main image {i}", i, tuple(sorted(tags))) for i, tags in sorted(labels.items())]


def read_voc(root: Path, p: IngestParams) -> list[Record]:
    if not (root / "Annotations").is_dir():
        return read_voc_imagesets(root, p)
    records = []
    for xml in sorted((root / "Annotations").glob("*.xml")):
        ref = f"Annotations/{xml.name}"
        try:
            doc = ET.parse(xml).getroot()
            filename = doc.findtext("filename") or xml.stem + ".jpg"
            tags = set()
            for obj in doc.iter("object"):
                difficult = (obj.findtext("difficult") or "0").strip() == "1"
                if not difficult or p.voc_difficult == "positive":
                    tags.add((obj.findtext("name") or "").strip())
            records.append(Record(ref, filename.strip(), tuple(sorted(t for t in tags if t))))
        except ET.ParseError as err:
            records.append(Record(ref, xml.stem, error=f"malformed XML ({err})"))
    return records


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise IngestError(f"annotations file not found: {path} (set ingest.annotations)") from None
    except UnicodeDecodeError as err:
        raise IngestError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); "
                          "re-save the file as UTF-8") from None


def read_records(p: IngestParams) -> tuple[str, list[Record]]:
    """(format used, records) from ``ingest.annotations``."""
    path = Path(p.annotations)
    if not path.exists():
        raise IngestError(f"annotations file not found: {path} (set ingest.annotations)")
    fmt = p.format if p.format != "auto" else detect_format(path)
    if fmt in ("csv", "tags_csv", "multihot_csv"):
        fmt, records = read_csv_records(path, p, fmt)
    elif fmt == "jsonl":
        records = read_jsonl(path, p)
    elif fmt == "coco":
        records = read_coco(path, p)
    else:
        records = read_voc(path, p)
    if not records:
        raise IngestError(f"{path}: no records")
    return fmt, records


def check_tags(record: Record, fmt: str, p: IngestParams) -> tuple[str, ...]:
    """The record's labels, sorted and de-duplicated, or RecordError saying what is wrong."""
    if record.error:
        raise RecordError(record.error)
    tags = tuple(sorted(set(record.tags)))
    if UNFILLED in tags:
        raise RecordError(f"not annotated yet: its tags still hold {UNFILLED!r} (a `multitag suggest --batch` "
                          "skeleton); write the image's labels, or leave the cell empty if it has none")
    for t in tags:
        bad = (_BAD_TAG if fmt == "tags_csv" else _CONTROL).search(t)
        if bad:
            raise RecordError(f"malformed tag {t!r}: contains {bad.group()!r}"
                              + (f" (is ingest.delimiter {p.delimiter!r} right for this file?)" if fmt == "tags_csv" else ""))
    if p.allowed_labels is not None:
        unknown = [t for t in tags if t not in p.allowed_labels]
        if unknown:
            raise RecordError(f"unknown label(s) {unknown}: not in ingest.allowed_labels")
    return tags


def images_root(p: IngestParams, fmt: str) -> str:
    """The folder (or s3:// prefix) image paths are relative to: ingest.images, else beside the
    annotations (a VOC layout's JPEGImages/)."""
    if p.images and p.images.startswith("s3://"):
        return p.images
    ann = Path(p.annotations)
    # absolute: the workers of a Dask cluster, started in other folders, must find it too
    return os.path.abspath(p.images or (ann / "JPEGImages" if fmt == "voc" else ann.parent))
