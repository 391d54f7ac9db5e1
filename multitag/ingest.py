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
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from multitag.compute import executor, map_chunks
from multitag.config import ComputeParams, IngestParams, Params
from multitag.errors import IngestError, RecordError
from multitag.formats import Record, check_tags, images_root, read_records
from multitag.images import DECODE_VERSION, decode, image_bytes, sha256
from multitag.layout import MANIFEST, SHARDS, Layout, read_manifest, split_for
from multitag.lineage import check_data_set, ingest_params
from multitag.progress import progress
from multitag.report import replace_dir, write_atomic, write_csv, write_json

log = logging.getLogger(__name__)


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
        chunks = map_chunks(_load_chunk, jobs, pool, chunk, compute)
        for results in progress(chunks, -(-len(jobs) // chunk), "ingest", f"chunks of {chunk} images", log):
            yield from results


Issue = tuple[int, str, str]  # (record number, image as written, reason)


def _check_records(records: list[Record], fmt: str, p: IngestParams, root: str, cache: Path | None):
    """(decode jobs, each valid record's labels, issues of the records refused before decoding)."""
    jobs, tags_of, issues = [], {}, []
    for i, record in enumerate(records):
        try:
            tags_of[i] = check_tags(record, fmt, p)
        except RecordError as err:
            issues.append((i, record.image, str(err)))
            continue
        jobs.append((i, record.image, root, p.image_size, cache))
    return jobs, tags_of, issues


def _deduplicate(decoded, records: list[Record], tags_of: dict, p: IngestParams, issues: list[Issue]):
    """(manifest rows, pixels by record number, decodes reused): each image kept once, the first of
    the same file content or the same pixels in another file (e.g. re-saved); the others and the
    images that did not decode are added to ``issues``."""
    seen: dict[str, int] = {}
    kept, pixels, cached = [], {}, 0
    for row, digest, arr, error, hit in decoded:
        cached += hit
        name = records[row].image
        if error:
            issues.append((row, name, error))
            continue
        pixel_digest = hashlib.sha256(arr.tobytes()).hexdigest()
        first = seen.get(digest, seen.get(pixel_digest))
        if first is not None:
            what = "same image content" if digest in seen else "same pixels in another file"
            same = tags_of[first] == tags_of[row]
            issues.append((row, name, f"duplicate of {records[first].ref} ({records[first].image}): {what}, "
                           + ("same labels" if same else
                              f"conflicting labels {list(tags_of[row])} vs {list(tags_of[first])}; "
                              f"kept {records[first].ref}")))
            continue
        seen[digest] = seen[pixel_digest] = row
        pixels[row] = arr
        kept.append({"row": row, "id": digest[:16], "source": name, "sha256": digest,
                     "split": split_for(digest, p.val_fraction, p.test_fraction), "tags": list(tags_of[row])})
    return kept, pixels, cached


def _write_prepared(kept: list[dict], pixels: dict, p: IngestParams, layout: Layout) -> pd.DataFrame:
    """The shards and the manifest (sorted by content hash), replacing data/prepared whole."""
    manifest = pd.DataFrame(kept).sort_values("sha256", ignore_index=True)
    order = manifest.pop("row").tolist()
    manifest["shard"] = np.arange(len(manifest)) // p.shard_size
    manifest["offset"] = np.arange(len(manifest)) % p.shard_size
    tmp = layout.prepared.with_name(layout.prepared.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / SHARDS).mkdir(parents=True)
    for shard, start in enumerate(range(0, len(order), p.shard_size)):
        np.save(tmp / SHARDS / f"{shard:05d}.npy", np.stack([pixels[r] for r in order[start:start + p.shard_size]]))
    manifest.to_parquet(tmp / MANIFEST, index=False)
    replace_dir(tmp, layout.prepared)
    return manifest


def _case_warnings(manifest: pd.DataFrame) -> list[str]:
    spellings: dict[str, set[str]] = {}
    for tags in manifest["tags"]:
        for t in tags:
            spellings.setdefault(t.casefold(), set()).add(t)
    return [f"labels {sorted(v)} differ only by case: kept apart (labels are case-sensitive)"
            for v in spellings.values() if len(v) > 1]


def ingest(p: IngestParams, layout: Layout, cache: bool = True, compute: ComputeParams = ComputeParams()) -> IngestResult:
    """Validate every record, decode and resize images, write shards + manifest and the issues report.
    Outputs depend on the annotations, the images' bytes and ``p`` alone (``cache``: reuse decodes
    kept in the workspace's decode cache, which changes speed, never results; ``compute``: where the
    decoding runs, this machine or a Dask cluster, which changes nothing else either)."""
    if compute.dask and compute.dask.startswith("tcp://"):
        cache = False  # the workers are other machines: the workspace's cache folder is not theirs
    fmt, records = read_records(p)
    jobs, tags_of, issues = _check_records(records, fmt, p, images_root(p, fmt), layout.decode_cache if cache else None)
    kept, pixels, cached = _deduplicate(_decode_all(jobs, p.workers, compute), records, tags_of, p, issues)
    issues.sort()
    report = write_csv(layout.ingest_issues, ["record", "image", "reason"],
                       [(records[i].ref, image, reason) for i, image, reason in issues], for_people=True)
    if not kept:
        raise IngestError(f"{p.annotations}: none of the {len(records)} records is usable; reasons in {report}")
    _check_rejections(p, len(records), issues, records, report)
    manifest = _write_prepared(kept, pixels, p, layout)
    warnings = _case_warnings(manifest)
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
