"""Ingest stage: annotations + images -> validated, deduplicated uint8 shards and a manifest.

Bad records never stop the run: each lands in ``reports/ingest_issues.csv`` with its row, image
and the reason, and the run goes on with the valid ones. Problems with the file as a whole (missing
file, wrong columns, not UTF-8, no rows) stop the run with a message saying what to fix.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pandas as pd
from multitag.config import IngestParams
from multitag.images import RecordError, decode, read_bytes, resolve_image, sha256
from multitag.progress import progress

log = logging.getLogger(__name__)

MANIFEST = "manifest.parquet"
SHARDS = "shards"
_BAD_TAG = re.compile(r"[\x00-\x1f\x7f,;|]")


class IngestError(RuntimeError):
    """The annotations file as a whole is unusable; the message says what to fix."""


@dataclass(frozen=True)
class IngestResult:
    records: int
    accepted: int
    rejected: int
    negatives: int
    splits: dict
    data_version: str
    issues_report: str


def split_for(digest: str, val_fraction: float, test_fraction: float) -> str:
    """train/val/test from the content hash alone, so adding images never moves an old one."""
    u = int(digest[:16], 16) / 2**64
    if u < test_fraction:
        return "test"
    return "val" if u < test_fraction + val_fraction else "train"


def parse_tags(value: str, delimiter: str) -> list[str]:
    """Sorted, de-duplicated labels of one record; '' means no labels (a valid negative)."""
    tags = sorted({t.strip() for t in value.split(delimiter) if t.strip()})
    for t in tags:
        bad = _BAD_TAG.search(t)
        if bad:
            raise RecordError(f"malformed tag {t!r}: contains {bad.group()!r} "
                              f"(is ingest.delimiter {delimiter!r} right for this file?)")
    return tags


def read_annotations(p: IngestParams) -> pd.DataFrame:
    path = Path(p.annotations)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except FileNotFoundError:
        raise IngestError(f"annotations file not found: {path} (set ingest.annotations)") from None
    except UnicodeDecodeError as err:
        raise IngestError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); "
                          "re-save the file as UTF-8") from None
    except pd.errors.EmptyDataError:
        raise IngestError(f"{path}: empty file, expected a header '{p.image_column},{p.tags_column}'") from None
    except pd.errors.ParserError as err:
        raise IngestError(f"{path}: not a readable CSV file ({err})") from None
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in (p.image_column, p.tags_column) if c not in df.columns]
    if missing:
        raise IngestError(f"{path}: missing column(s) {missing}; the file has {list(df.columns)} "
                          "(set ingest.image_column / ingest.tags_column)")
    if df.empty:
        raise IngestError(f"{path}: no records (only a header)")
    return df


def _load_record(args):
    row, name, root, size = args
    try:
        path = resolve_image(Path(root), name)
        data = read_bytes(path)
        return row, sha256(data), decode(data, size, name), None
    except RecordError as err:
        return row, None, None, str(err)


def _decode_all(jobs: list, workers: int):
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(jobs) < 256:  # a process pool costs more than it saves on tiny inputs
        yield from progress(map(_load_record, jobs), len(jobs), "ingest", "images", log)
        return
    with Pool(workers) as pool:
        yield from progress(pool.imap(_load_record, jobs, chunksize=64), len(jobs), "ingest", "images", log)


def _write_atomic_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def ingest(p: IngestParams, out_dir: str | Path = "data/prepared",
           reports_dir: str | Path = "reports") -> IngestResult:
    """Validate every record, decode and resize images, write shards + manifest and the issues report."""
    out_dir, reports_dir = Path(out_dir), Path(reports_dir)
    df = read_annotations(p)
    issues: list[tuple[int, str, str]] = []
    jobs, tags_of = [], {}
    for i, (name, tags) in enumerate(zip(df[p.image_column], df[p.tags_column])):
        row = i + 2  # line in the file: the header is line 1
        try:
            tags_of[row] = parse_tags(tags, p.delimiter)
        except RecordError as err:
            issues.append((row, name, str(err)))
            continue
        jobs.append((row, name.strip(), p.images, p.image_size))
    names = {row: name for row, name, _, _ in jobs}

    seen: dict[str, int] = {}
    kept: list[dict] = []
    pixels: dict[int, np.ndarray] = {}
    for row, digest, arr, error in _decode_all(jobs, p.workers):
        if error:
            issues.append((row, names[row], error))
            continue
        if digest in seen:
            first = seen[digest]
            same = tags_of[first] == tags_of[row]
            issues.append((row, names[row], f"duplicate of row {first} ({names[first]}): same image content, "
                           + ("same labels" if same else
                              f"conflicting labels {tags_of[row]} vs {tags_of[first]}; kept row {first}")))
            continue
        seen[digest] = row
        pixels[row] = arr
        kept.append({"row": row, "id": digest[:16], "source": names[row], "sha256": digest,
                     "split": split_for(digest, p.val_fraction, p.test_fraction), "tags": tags_of[row]})
    if not kept:
        raise IngestError(f"{p.annotations}: none of the {len(df)} records is usable; "
                          f"first problems: {issues[:3]}")

    manifest = pd.DataFrame(kept).sort_values("sha256", ignore_index=True)
    order = manifest.pop("row").tolist()
    manifest["shard"] = np.arange(len(manifest)) // p.shard_size
    manifest["offset"] = np.arange(len(manifest)) % p.shard_size

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / SHARDS).mkdir(parents=True)
    for shard, start in enumerate(range(0, len(order), p.shard_size)):
        batch = np.stack([pixels[r] for r in order[start:start + p.shard_size]])
        np.save(tmp / SHARDS / f"{shard:05d}.npy", batch)
    manifest.to_parquet(tmp / MANIFEST, index=False)
    _write_atomic_dir(tmp, out_dir)

    reports_dir.mkdir(parents=True, exist_ok=True)
    issues.sort()
    report = reports_dir / "ingest_issues.csv"
    with report.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["row", "image", "reason"])
        w.writerows(issues)
    version = hashlib.sha256("\n".join(
        f"{d} {' '.join(t)}" for d, t in zip(manifest["sha256"], manifest["tags"])).encode()).hexdigest()
    result = IngestResult(
        records=len(df), accepted=len(manifest), rejected=len(issues),
        negatives=int((manifest["tags"].map(len) == 0).sum()),
        splits={s: int((manifest["split"] == s).sum()) for s in ("train", "val", "test")},
        data_version=version[:16], issues_report=str(report))
    (reports_dir / "ingest.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    log.info("ingested %d of %d records (%d negatives); splits %s", result.accepted, result.records,
             result.negatives, result.splits)
    if issues:
        log.warning("%d record(s) rejected, reasons in %s", len(issues), report)
    return result
