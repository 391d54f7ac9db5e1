"""Ingest stage: annotations + images -> validated, deduplicated uint8 shards and a manifest.

Bad records never stop the run: each lands in ``reports/ingest_issues.csv`` with its record
(e.g. ``line 12``), image and the reason, and the run goes on with the valid ones. Problems with
the file as a whole (missing file, wrong columns, not UTF-8, no rows) stop the run with a message
saying what to fix.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from multitag.compute import executor, map_chunks
from multitag.config import ComputeParams, IngestParams, Params
from multitag.errors import IngestError, RecordError
from multitag.formats import Record, read_records
from multitag.images import DECODE_VERSION, IMAGE_SUFFIXES, decode, read_bytes, read_s3, resolve_image, sha256
from multitag.layout import MANIFEST, SHARDS, Layout, read_manifest, split_for
from multitag.lineage import check_data_set, ingest_params
from multitag.progress import progress
from multitag.report import replace_dir, write_atomic, write_csv, write_json

log = logging.getLogger(__name__)

_BAD_TAG = re.compile(r"[\x00-\x1f\x7f,;|]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
UNFILLED = "?"  # the tag cell of an image still to be annotated (multitag suggest --batch writes it)


def _check_rejections(p: IngestParams, total: int, issues: list, records: list[Record], report: Path) -> None:
    """ingest.strict fails on any rejection; max_rejected_fraction on too many (usually a wrong
    setting, such as the image folder or the delimiter, rather than bad images)."""
    first = "; ".join(f"{records[i].ref} {image}: {reason}" for i, image, reason in issues[:5])
    if p.strict and issues:
        raise IngestError(f"ingest.strict: {len(issues)} of {total} records rejected (all in {report}); "
                          f"first: {first}")
    if len(issues) > p.max_rejected_fraction * total:
        raise IngestError(f"{len(issues)} of {total} records rejected, more than ingest.max_rejected_fraction="
                          f"{p.max_rejected_fraction}: check ingest.images, ingest.format and the column/"
                          f"delimiter settings (all reasons in {report}); first: {first}")


@dataclass(frozen=True)
class IngestResult:
    records: int
    accepted: int
    format: str
    rejected: int
    negatives: int
    splits: dict
    data_version: str
    issues_report: str
    label_warnings: list


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
    if p.images:
        return p.images
    ann = Path(p.annotations)
    return str(ann / "JPEGImages" if fmt == "voc" else ann.parent)


def image_bytes(root: str, name: str) -> bytes:
    """An image's bytes, read only from under the image folder ``root`` (a local folder or an s3://
    prefix): a path that leads anywhere else is refused as a RecordError, before anything is read."""
    if name.startswith("s3://"):  # a full URI is accepted only inside the configured prefix
        prefix = root.rstrip("/") + "/"
        if not root.startswith("s3://") or not name.startswith(prefix) or ".." in name[len(prefix):].split("/"):
            raise RecordError(f"image {name!r} is outside the image folder {root!r} (ingest.images): only images "
                              "under it are read")
        return read_s3(name)
    if root.startswith("s3://"):
        if name.startswith("/") or ".." in name.split("/"):
            raise RecordError(f"path {name!r} refused: image paths must be relative to the image folder, inside it")
        return read_s3(f"{root.rstrip('/')}/{name}")
    try:
        path = local_image_path(root, name)
    except OSError as err:  # e.g. a name longer than the file system allows
        raise RecordError(f"image path {name!r} cannot be opened: {err.strerror or err}") from None
    return read_bytes(path)


def local_image_path(root: str, name: str) -> Path:
    """The file of image ``name`` under the local folder ``root``: the path finally opened is the one
    checked (RecordError if it escapes). A name without extension (Kaggle Planet: ``train_1``) finds
    its one file with an image extension; several such files make the record ambiguous."""
    path = resolve_image(Path(root), name)
    if path.suffix or path.exists():
        return path
    found: dict[Path, str] = {}
    for ext in IMAGE_SUFFIXES:
        for suffix in (ext, ext.upper()):
            candidate = Path(root) / (name + suffix)
            if candidate.exists() or candidate.is_symlink():
                found.setdefault(resolve_image(Path(root), name + suffix), name + suffix)
    if len(found) > 1:
        raise RecordError(f"ambiguous image name {name!r}: {', '.join(sorted(found.values()))} all exist; "
                          "write the extension in the annotations")
    return next(iter(found), path)


def _cached_decode(data: bytes, digest: str, size: int, name: str, cache: Path | None) -> tuple[np.ndarray, bool]:
    """(pixels, came from cache): an image already decoded at this size is read back, not decoded."""
    if cache is None:
        return decode(data, size, name), False
    path = cache / f"v{DECODE_VERSION}-{size}px" / digest[:2] / f"{digest}.npy"
    if path.exists():
        return np.load(path), True
    arr = decode(data, size, name)
    buffer = io.BytesIO()
    np.save(buffer, arr)
    write_atomic(path, buffer.getvalue())
    return arr, False


def _load_record(args):
    row, name, root, size, cache = args
    try:
        data = image_bytes(root, name)
        digest = sha256(data)
        arr, hit = _cached_decode(data, digest, size, name, cache)
        return row, digest, arr, None, hit
    except RecordError as err:
        return row, None, None, str(err), False


def _load_chunk(jobs: list) -> list:
    return [_load_record(job) for job in jobs]


def _decode_all(jobs: list, workers: int, compute: ComputeParams):
    """Every job's (row, digest, pixels, error, from cache), in job order, on the engine compute says."""
    local = 1 if len(jobs) < 256 and compute.dask is None else workers  # a pool costs more than it saves
    chunk = compute.chunk if compute.dask else max(16, min(compute.chunk, len(jobs) // (4 * (os.cpu_count() or 1)) + 1))
    with executor(compute, local) as pool:
        chunks = map_chunks(_load_chunk, jobs, pool, chunk, compute.dask or "this machine")
        for results in progress(chunks, -(-len(jobs) // chunk), "ingest", f"chunks of {chunk} images", log):
            yield from results


def ingest(p: IngestParams, layout: Layout, cache: bool = True, compute: ComputeParams = ComputeParams()) -> IngestResult:
    """Validate every record, decode and resize images, write shards + manifest and the issues report.
    Outputs depend on the annotations, the images' bytes and ``p`` alone (``cache``: reuse decodes
    kept in the workspace's decode cache, which changes speed, never results; ``compute``: where the
    decoding runs, this machine or a Dask cluster, which changes nothing else either)."""
    if compute.dask and compute.dask.startswith("tcp://"):
        cache = False  # the workers are other machines: the workspace's cache folder is not theirs
    fmt, records = read_records(p)
    root = images_root(p, fmt)
    issues: list[tuple[int, str, str]] = []
    jobs, tags_of = [], {}
    for i, record in enumerate(records):
        try:
            tags_of[i] = check_tags(record, fmt, p)
        except RecordError as err:
            issues.append((i, record.image, str(err)))
            continue
        jobs.append((i, record.image, root, p.image_size, layout.decode_cache if cache else None))
    names = {i: r.image for i, r in enumerate(records)}

    seen: dict[str, int] = {}
    kept: list[dict] = []
    pixels: dict[int, np.ndarray] = {}
    cached = 0
    for row, digest, arr, error, hit in _decode_all(jobs, p.workers, compute):
        cached += hit
        if error:
            issues.append((row, names[row], error))
            continue
        # Same file content, or the same pixels in another file (e.g. re-saved): one image, kept once.
        pixel_digest = hashlib.sha256(arr.tobytes()).hexdigest()
        first = seen.get(digest, seen.get(pixel_digest))
        if first is not None:
            what = "same image content" if digest in seen else "same pixels in another file"
            same = tags_of[first] == tags_of[row]
            issues.append((row, names[row], f"duplicate of {records[first].ref} ({names[first]}): {what}, "
                           + ("same labels" if same else
                              f"conflicting labels {list(tags_of[row])} vs {list(tags_of[first])}; "
                              f"kept {records[first].ref}")))
            continue
        seen[digest] = seen[pixel_digest] = row
        pixels[row] = arr
        kept.append({"row": row, "id": digest[:16], "source": names[row], "sha256": digest,
                     "split": split_for(digest, p.val_fraction, p.test_fraction), "tags": list(tags_of[row])})
    issues.sort()
    report = write_csv(layout.ingest_issues, ["record", "image", "reason"],
                       [(records[i].ref, image, reason) for i, image, reason in issues])
    if not kept:
        raise IngestError(f"{p.annotations}: none of the {len(records)} records is usable; "
                          f"reasons in {report}")
    _check_rejections(p, len(records), issues, records, report)

    manifest = pd.DataFrame(kept).sort_values("sha256", ignore_index=True)
    order = manifest.pop("row").tolist()
    manifest["shard"] = np.arange(len(manifest)) // p.shard_size
    manifest["offset"] = np.arange(len(manifest)) % p.shard_size

    out_dir = layout.prepared
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / SHARDS).mkdir(parents=True)
    for shard, start in enumerate(range(0, len(order), p.shard_size)):
        batch = np.stack([pixels[r] for r in order[start:start + p.shard_size]])
        np.save(tmp / SHARDS / f"{shard:05d}.npy", batch)
    manifest.to_parquet(tmp / MANIFEST, index=False)
    replace_dir(tmp, out_dir)

    spellings: dict[str, set[str]] = {}
    for tags in manifest["tags"]:
        for t in tags:
            spellings.setdefault(t.casefold(), set()).add(t)
    warnings = [f"labels {sorted(v)} differ only by case: kept apart (labels are case-sensitive)"
                for v in spellings.values() if len(v) > 1]
    for w in warnings:
        log.warning("%s", w)
    version = hashlib.sha256("\n".join(
        f"{d} {' '.join(t)}" for d, t in zip(manifest["sha256"], manifest["tags"])).encode()).hexdigest()
    result = IngestResult(
        records=len(records), accepted=len(manifest), format=fmt, rejected=len(issues),
        negatives=int((manifest["tags"].map(len) == 0).sum()),
        splits={s: int((manifest["split"] == s).sum()) for s in ("train", "val", "test")},
        data_version=version[:16], issues_report=os.path.relpath(report, layout.root), label_warnings=warnings)
    write_json(layout.ingest_summary, asdict(result))
    log.info("ingested %d of %d records (%d negatives, %d decodes reused from %s); splits %s", result.accepted,
             result.records, result.negatives, cached, layout.decode_cache, result.splits)
    if issues:
        log.warning("%d record(s) rejected, reasons in %s", len(issues), report)
    return result


def run(params: Params, layout: Layout) -> IngestResult:
    """The ingest stage as dvc.yaml runs it: the data set of this workspace's lineage (params.yaml's,
    or the raw data once retraining began), refusing one another champion was trained on."""
    result = ingest(ingest_params(params), layout, compute=params.compute)
    labels = {t for tags in read_manifest(layout, ["tags"])["tags"] for t in tags}
    check_data_set(params, layout, labels)
    return result
