import csv
import io
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from multitag.config import IngestParams
from multitag.errors import IngestError
from multitag.ingest import ingest
from multitag.layout import Layout


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


def _report(ws):
    with ws.ingest_issues.open(newline="") as f:
        return {int(r["record"].removeprefix("line ")): (r["image"], r["reason"]) for r in csv.DictReader(f)}


def test_bad_records_are_reported_and_valid_ones_kept(messy, tmp_path):
    ws = Layout(tmp_path / "ws")
    result = ingest(messy, ws)
    issues = _report(ws)
    expect = {  # row in the file -> words the reason must contain
        8: "not found", 9: "corrupt or truncated", 10: "not a readable image", 11: "zero-byte",
        12: "duplicate of line 2", 13: "duplicate of line 3", 14: "outside the image folder",
        15: "absolute path", 16: "outside the image folder", 17: "malformed tag 'car,dog'",
    }
    assert set(issues) == set(expect)
    for row, words in expect.items():
        assert words in issues[row][1], (row, issues[row])
    assert "conflicting labels" in issues[13][1] and "same labels" in issues[12][1]

    manifest = pd.read_parquet(ws.manifest)
    assert sorted(manifest["source"]) == [f"ok{i}.png" for i in range(6)]
    tags = dict(zip(manifest["source"], manifest["tags"].map(list)))
    assert tags["ok2.png"] == []                       # untagged: kept as a negative
    assert tags["ok3.png"] == ["car", "cat"]           # whitespace trimmed, sorted
    assert result.accepted == 6 and result.rejected == 10 and result.negatives == 1
    assert set(manifest["split"]) <= {"train", "val", "test"}
    shards = sorted(ws.shards.glob("*.npy"))
    assert len(shards) == 2  # shard_size 4
    arr = np.load(shards[0])
    assert arr.dtype == np.uint8 and arr.shape[1:] == (16, 16, 3)
    summary = json.loads(ws.ingest_summary.read_text())
    assert summary["rejected"] == 10 and summary["splits"] == result.splits


def test_pixels_match_manifest_rows(messy, tmp_path):
    ws = Layout(tmp_path / "ws")
    ingest(messy, ws)
    manifest = pd.read_parquet(ws.manifest)
    from multitag.images import decode
    for _, r in manifest.iterrows():
        shard = np.load(ws.shard(r["shard"]))
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
        ingest(IngestParams(annotations=str(ann), images=str(tmp_path)), Layout(tmp_path / "ws"))


def test_missing_annotations_and_non_utf8(tmp_path):
    with pytest.raises(IngestError, match="annotations file not found"):
        ingest(IngestParams(annotations=str(tmp_path / "nope.csv"), images=str(tmp_path)), Layout(tmp_path / "ws"))
    ann = tmp_path / "latin1.csv"
    ann.write_bytes("image_name,tags\ncaf\xe9.png,x\n".encode("latin-1"))
    with pytest.raises(IngestError, match="not UTF-8"):
        ingest(IngestParams(annotations=str(ann), images=str(tmp_path)), Layout(tmp_path / "ws"))


def test_nothing_usable_is_an_error(tmp_path):
    ann = tmp_path / "a.csv"
    ann.write_text("image_name,tags\nmissing.png,x\n")
    with pytest.raises(IngestError, match="none of the 1 records is usable"):
        ingest(IngestParams(annotations=str(ann), images=str(tmp_path)), Layout(tmp_path / "ws"))


def test_reingest_reuses_decoded_images_and_writes_identical_outputs(messy, tmp_path, monkeypatch):
    first, second = Layout(tmp_path / "ws1"), Layout(tmp_path / "ws2")
    ingest(messy, first)
    second.decode_cache.parent.mkdir(parents=True)
    shutil.copytree(first.decode_cache, second.decode_cache)  # the same cache: nothing to decode again

    def no_decoding(*args, **kwargs):
        raise AssertionError("an already ingested image was decoded again")
    monkeypatch.setattr("multitag.ingest.decode", no_decoding)
    bad = tmp_path / "images" / "truncated.png"
    bad.unlink()  # the failing files are never cached: keep the rest of the run decode-free
    (tmp_path / "images" / "text.jpg").unlink()
    ingest(messy, second)
    files = sorted(p.relative_to(first.prepared) for p in first.prepared.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second.prepared) for p in second.prepared.rglob("*") if p.is_file())
    for f in files:  # outputs are a function of the inputs: no trace of the cache, the time or the folder
        assert (first.prepared / f).read_bytes() == (second.prepared / f).read_bytes(), f


def test_outputs_do_not_depend_on_file_times(messy, tmp_path):
    import os

    a, b = Layout(tmp_path / "a"), Layout(tmp_path / "b")
    ingest(messy, a, cache=False)
    for f in (tmp_path / "images").iterdir():
        if not f.is_symlink():
            os.utime(f, ns=(10**18, 10**18))
    ingest(messy, b, cache=False)
    assert a.manifest.read_bytes() == b.manifest.read_bytes()
    assert a.ingest_summary.read_bytes() == b.ingest_summary.read_bytes()
