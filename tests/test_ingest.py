import csv
import io
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from multitag.config import IngestParams
from multitag.ingest import IngestError, ingest


def _png(seed: int, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def messy(tmp_path):
    """Images + annotations with every kind of bad record the foundation handles."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):
        (images / f"ok{i}.png").write_bytes(_png(i))
    (images / "truncated.png").write_bytes(_png(99)[:60])
    (images / "text.jpg").write_text("this is not an image")
    (images / "empty.png").write_bytes(b"")
    (images / "copy_of_ok0.png").write_bytes(_png(0))
    (tmp_path / "outside.png").write_bytes(_png(50))
    (images / "link.png").symlink_to(tmp_path / "outside.png")
    rows = [
        ("ok0.png", "cat dog"), ("ok1.png", "dog"), ("ok2.png", ""), ("ok3.png", " cat  car "),
        ("ok4.png", "Cat"), ("ok5.png", "car"),
        ("missing.png", "cat"), ("truncated.png", "dog"), ("text.jpg", "dog"), ("empty.png", "dog"),
        ("copy_of_ok0.png", "cat dog"), ("ok1.png", "cat"),
        ("../outside.png", "cat"), (str(tmp_path / "outside.png"), "cat"), ("link.png", "cat"),
        ("ok5.png", "car,dog"),
    ]
    ann = tmp_path / "annotations.csv"
    with ann.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_name", "tags"])
        w.writerows(rows)
    return IngestParams(annotations=str(ann), images=str(images), image_size=16, shard_size=4,
                        max_rejected_fraction=1.0)


def _report(reports):
    with (reports / "ingest_issues.csv").open(newline="") as f:
        return {int(r["record"].removeprefix("line ")): (r["image"], r["reason"]) for r in csv.DictReader(f)}


def test_bad_records_are_reported_and_valid_ones_kept(messy, tmp_path):
    result = ingest(messy, tmp_path / "prepared", tmp_path / "reports")
    issues = _report(tmp_path / "reports")
    expect = {  # row in the file -> words the reason must contain
        8: "not found", 9: "corrupt or truncated", 10: "not a readable image", 11: "zero-byte",
        12: "duplicate of line 2", 13: "duplicate of line 3", 14: "outside the image folder",
        15: "absolute path", 16: "outside the image folder", 17: "malformed tag 'car,dog'",
    }
    assert set(issues) == set(expect)
    for row, words in expect.items():
        assert words in issues[row][1], (row, issues[row])
    assert "conflicting labels" in issues[13][1] and "same labels" in issues[12][1]

    manifest = pd.read_parquet(tmp_path / "prepared" / "manifest.parquet")
    assert sorted(manifest["source"]) == [f"ok{i}.png" for i in range(6)]
    tags = dict(zip(manifest["source"], manifest["tags"].map(list)))
    assert tags["ok2.png"] == []                       # untagged: kept as a negative
    assert tags["ok3.png"] == ["car", "cat"]           # whitespace trimmed, sorted
    assert result.accepted == 6 and result.rejected == 10 and result.negatives == 1
    assert set(manifest["split"]) <= {"train", "val", "test"}
    shards = sorted((tmp_path / "prepared" / "shards").glob("*.npy"))
    assert len(shards) == 2  # shard_size 4
    arr = np.load(shards[0])
    assert arr.dtype == np.uint8 and arr.shape[1:] == (16, 16, 3)
    summary = json.loads((tmp_path / "reports" / "ingest.json").read_text())
    assert summary["rejected"] == 10 and summary["splits"] == result.splits


def test_pixels_match_manifest_rows(messy, tmp_path):
    ingest(messy, tmp_path / "prepared", tmp_path / "reports")
    manifest = pd.read_parquet(tmp_path / "prepared" / "manifest.parquet")
    from multitag.images import decode
    for _, r in manifest.iterrows():
        shard = np.load(tmp_path / "prepared" / "shards" / f"{r['shard']:05d}.npy")
        expected = decode((tmp_path / "images" / r["source"]).read_bytes(), 16)
        np.testing.assert_array_equal(shard[r["offset"]], expected)


@pytest.mark.parametrize("content, match", [
    ("name,labels\na.png,x\n", r"missing column\(s\) \['image_name', 'tags'\]"),
    ("image_name,tags\n", "no records"),
    ("", "empty file"),
])
def test_unusable_annotation_files_fail_with_a_clear_message(tmp_path, content, match):
    ann = tmp_path / "a.csv"
    ann.write_text(content)
    with pytest.raises(IngestError, match=match):
        ingest(IngestParams(annotations=str(ann), images=str(tmp_path)), tmp_path / "p", tmp_path / "r")


def test_missing_annotations_and_non_utf8(tmp_path):
    with pytest.raises(IngestError, match="annotations file not found"):
        ingest(IngestParams(annotations=str(tmp_path / "nope.csv"), images=str(tmp_path)), tmp_path / "p")
    ann = tmp_path / "latin1.csv"
    ann.write_bytes("image_name,tags\ncaf\xe9.png,x\n".encode("latin-1"))
    with pytest.raises(IngestError, match="not UTF-8"):
        ingest(IngestParams(annotations=str(ann), images=str(tmp_path)), tmp_path / "p")


def test_nothing_usable_is_an_error(tmp_path):
    ann = tmp_path / "a.csv"
    ann.write_text("image_name,tags\nmissing.png,x\n")
    with pytest.raises(IngestError, match="none of the 1 records is usable"):
        ingest(IngestParams(annotations=str(ann), images=str(tmp_path)), tmp_path / "p", tmp_path / "r")


def test_reingest_reuses_decoded_images(messy, tmp_path, monkeypatch):
    p = messy.model_copy(update={"cache": str(tmp_path / "cache")})
    first = ingest(p, tmp_path / "p1", tmp_path / "r1")
    assert first.from_cache == 2  # the two rows repeating an image's content: decoded once

    def no_decoding(*args, **kwargs):
        raise AssertionError("an already ingested image was decoded again")
    monkeypatch.setattr("multitag.ingest.decode", no_decoding)
    bad = tmp_path / "images" / "truncated.png"
    bad.unlink()  # the failing files are never cached: keep the rest of the run decode-free
    (tmp_path / "images" / "text.jpg").unlink()
    second = ingest(p, tmp_path / "p2", tmp_path / "r2")
    assert second.from_cache == first.accepted + 2  # + the duplicate copies, same content
    for a, b in zip(sorted((tmp_path / "p1" / "shards").glob("*.npy")), sorted((tmp_path / "p2" / "shards").glob("*.npy"))):
        np.testing.assert_array_equal(np.load(a), np.load(b))


def test_an_unchanged_ingest_does_nothing_and_a_changed_image_is_seen(messy, tmp_path, caplog):
    import logging
    import os

    from multitag.ingest import INPUT_KEY, MANIFEST

    out, reports = tmp_path / "prepared", tmp_path / "reports"
    first = ingest(messy, out, reports)
    manifest_mtime = (out / MANIFEST).stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="multitag.ingest"):
        again = ingest(messy, out, reports)
    assert again == first and "unchanged since the last ingest" in caplog.text
    assert (out / MANIFEST).stat().st_mtime_ns == manifest_mtime  # nothing rewritten

    ok1 = tmp_path / "images" / "ok1.png"  # new content under the same name (and a newer mtime)
    ok1.write_bytes(_png(123))
    os.utime(ok1, ns=(ok1.stat().st_atime_ns, ok1.stat().st_mtime_ns + 10**9))
    changed = ingest(messy, out, reports)
    assert changed.data_version != first.data_version and (out / INPUT_KEY).is_file()
    ingest(messy.model_copy(update={"image_size": 8}), out, reports)  # other params: ingested again
    assert np.load(out / "shards" / "00000.npy").shape[1:] == (8, 8, 3)
