"""Security: an input never reads, moves or reveals what lies outside its own folder or bucket.

The hostile set at the end feeds annotation rows and inbox batches made to escape, confuse or
break the pipeline; for each: every record is kept or reported, no file outside the input is opened,
and every file of a batch ends in the archive or the rejected area."""

import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from multitag.config import IngestParams, parse_params
from multitag.errors import BatchRejected
from multitag.inbox import READY, REPORT, Inbox, take_in
from multitag.ingest import ingest
from multitag.layout import Layout
from multitag.logs import MASK, redact
from multitag.report import read_csv_rows
from tests.conftest import tiny_params


def png(seed: int, size=(12, 12), mode="RGB") -> bytes:
    buf = io.BytesIO()
    arr = np.random.default_rng(seed).integers(0, 255, (*size[::-1], 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(buf, "PNG")
    return buf.getvalue()


class Opened:
    """Paths this process opens while active (Python's audit hook: every open, by any module)."""
    watching: list | None = None

    @classmethod
    def hook(cls, event, args):
        if event == "open" and cls.watching is not None and isinstance(args[0], (str, bytes, os.PathLike)):
            try:
                cls.watching.append(Path(os.fsdecode(args[0])).resolve())
            except (OSError, ValueError, RuntimeError):
                pass


sys.addaudithook(Opened.hook)


@pytest.fixture
def opened():
    Opened.watching = []
    yield Opened.watching
    Opened.watching = None


@pytest.fixture
def secret(tmp_path):
    """A private file and folder outside every input."""
    private = tmp_path / "private"
    private.mkdir()
    (private / "secret.png").write_bytes(png(999))
    (private / "inner.png").write_bytes(png(998))
    return private


def _ingest_rows(tmp_path, rows, **params):
    ann = tmp_path / "annotations.csv"
    pd.DataFrame(rows, columns=["image_name", "tags"]).to_csv(ann, index=False)
    p = IngestParams(annotations=str(ann), images=str(tmp_path / "images"), image_size=8, max_rejected_fraction=1.0,
                     **params)
    ws = Layout(tmp_path / "ws")
    return ingest(p, ws), ws


def test_extensionless_names_are_checked_where_they_finally_lead(tmp_path, secret, opened):
    images = tmp_path / "images"
    images.mkdir()
    (images / "secret.png").symlink_to(secret / "secret.png")
    for ext in (".webp", ".bmp", ".tiff"):
        Image.open(io.BytesIO(png(1))).save(images / f"ok{ext}")
    (images / "fine.png").write_bytes(png(2))
    result, ws = _ingest_rows(tmp_path, [("secret", "a"), ("ok", "b"), ("fine", "c")])
    seen = set(opened)
    issues = {r["image"]: r["reason"] for r in read_csv_rows(ws.ingest_issues)}
    assert "outside the image folder" in issues["secret"]
    assert "ambiguous image name 'ok'" in issues["ok"] and "ok.bmp" in issues["ok"]
    assert result.accepted == 1 and (secret / "secret.png").resolve() not in seen


def test_inbox_marker_checksums_are_verified_and_paths_refused_unprobed(tmp_path):
    params = parse_params(tiny_params(), lineage={"raw": "started"})
    inbox = Inbox(params, tmp_path)
    batch = tmp_path / "b"
    (batch / "images").mkdir(parents=True)
    (batch / "images" / "a.png").write_bytes(png(1))
    (batch / "labels.csv").write_text("image_name,tags\nimages/a.png,cat\n")
    inbox.add(batch, params.ingest, {}, name="swapped")
    inbox.incoming.put_bytes("swapped/images/a.png", png(2))  # replaced after the marker was written
    inbox.add(batch, params.ingest, {}, name="escape")
    marker = json.loads(inbox.incoming.get_bytes(f"escape/{READY}")[0])
    marker["files"]["../../../../etc/passwd"] = "0" * 64
    inbox.incoming.put_bytes(f"escape/{READY}", json.dumps(marker).encode())
    intake = take_in(params, Layout(tmp_path))
    reasons = {r["batch"]: r["reason"] for r in intake["rejected"]}
    assert "images/a.png does not match its sha256 in _READY.json" in reasons["swapped"]
    # refused for its path, before any check of whether it exists ("missing" would mean it was looked up)
    assert "'../../../../etc/passwd', which is not a path inside the batch" in reasons["escape"]
    for name in ("swapped", "escape"):
        assert json.loads(inbox.rejected.get_bytes(f"{name}/{REPORT}")[0])["reason"] == reasons[name]
        assert inbox.rejected.exists(f"{name}/labels.csv")  # nothing lost


def test_symlinks_in_a_local_batch_are_never_followed(tmp_path, secret, opened):
    params = parse_params(tiny_params(), lineage={"raw": "started"})
    inbox = Inbox(params, tmp_path)
    folder = tmp_path / "inbox" / "sneaky"
    folder.mkdir(parents=True)
    (folder / "a.png").write_bytes(png(1))
    (folder / "b.png").symlink_to(secret / "secret.png")
    (folder / "more").symlink_to(secret, target_is_directory=True)
    (folder / "labels.csv").write_text("image_name,tags\na.png,cat\nb.png,dog\nmore/inner.png,dog\n")
    (folder / READY).write_text("{}")
    intake = take_in(params, Layout(tmp_path))
    seen = set(opened)  # what the pipeline opened (not this test's checks below)
    [rejected] = intake["rejected"]
    assert "symbolic links (b.png, more)" in rejected["reason"]
    area = tmp_path / "inbox-rejected" / "sneaky"
    copied = {p.read_bytes() for p in area.rglob("*") if p.is_file()}
    assert (secret / "secret.png").read_bytes() not in copied and (secret / "inner.png").read_bytes() not in copied
    assert (area / "a.png").exists() and (area / "labels.csv").exists() and not (tmp_path / "inbox" / "sneaky").exists()
    assert (secret / "secret.png").exists()  # the link was removed, never its target
    assert not {(secret / "secret.png").resolve(), (secret / "inner.png").resolve()} & seen
    with pytest.raises(BatchRejected, match="symbolic links"):  # `inbox add` refuses such a folder at once
        inbox.add(_folder_with_link(tmp_path, secret), params.ingest, {})


def _folder_with_link(tmp_path, secret):
    folder = tmp_path / "to-add"
    folder.mkdir()
    (folder / "labels.csv").write_text("image_name,tags\nx.png,cat\n")
    (folder / "x.png").symlink_to(secret / "secret.png")
    return folder


def test_s3_uris_outside_the_image_folder_are_refused_per_record(tmp_path, s3_bucket):
    import boto3

    s3 = boto3.client("s3")
    s3.put_object(Bucket=s3_bucket, Key="private/secret.png", Body=png(999))
    s3.put_object(Bucket=s3_bucket, Key="photos/a.png", Body=png(1))
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "local.png").write_bytes(png(2))
    _, ws = _ingest_rows(tmp_path, [("local.png", "a"), (f"s3://{s3_bucket}/private/secret.png", "b")])
    issues = {r["image"]: r["reason"] for r in read_csv_rows(ws.ingest_issues)}
    assert "outside the image folder" in issues[f"s3://{s3_bucket}/private/secret.png"]
    ann = tmp_path / "s3.csv"
    ann.write_text(f"image_name,tags\na.png,a\ns3://{s3_bucket}/private/secret.png,b\n"
                   f"s3://{s3_bucket}/photos/../private/secret.png,b\ns3://{s3_bucket}/photos/a.png,c\n")
    p = IngestParams(annotations=str(ann), images=f"s3://{s3_bucket}/photos", image_size=8, max_rejected_fraction=1.0)
    other = Layout(tmp_path / "ws-s3")
    result = ingest(p, other)
    reasons = [r["reason"] for r in read_csv_rows(other.ingest_issues)]
    assert sum("outside the image folder" in r for r in reasons) == 2
    assert result.accepted == 1 and any("duplicate" in r for r in reasons)  # photos/a.png twice: same image


def test_unreadable_files_are_per_record_errors_in_ingest_and_predict(tmp_path, monkeypatch):
    from multitag.models import build_model, save_model_file
    from multitag.predict import predict_folder
    from multitag.storage import LocalStore

    images = tmp_path / "images"
    images.mkdir()
    for name in ("ok.png", "locked.png"):
        (images / name).write_bytes(png(len(name)))
    (images / "locked.png").chmod(0)
    real = Path.read_bytes

    def read_bytes(self):  # as an unprivileged user sees a chmod 000 file (the tests may run as root)
        if self.name == "locked.png":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)
    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    result, ws = _ingest_rows(tmp_path, [("ok.png", "a"), ("locked.png", "b")])
    [issue] = read_csv_rows(ws.ingest_issues)
    assert issue["image"] == "locked.png" and "permission denied" in issue["reason"] and result.accepted == 1
    save_model_file(tmp_path / "m.pt", arch="simple_cnn", labels=["a", "b"], image_size=8,
                    state_dict=build_model("simple_cnn", 2, 8).state_dict())
    out = predict_folder(images, str(tmp_path / "m.pt"), LocalStore(tmp_path / "store"), "m", tmp_path / "p.csv")
    rows = {r["image"]: r for r in read_csv_rows(tmp_path / "p.csv")}
    assert out["failed"] == 1 and "permission denied" in rows["locked.png"]["error"] and rows["ok.png"]["p_a"]


def test_credentials_are_masked_whatever_their_length(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "k3y")
    monkeypatch.setenv("PREFECT_API_KEY", "pk")
    monkeypatch.setenv("SOME_TOKEN", "short")  # secret-looking but not a credential variable: 8+ chars only
    assert redact("id k3y, api pk, token short") == f"id {MASK}, api {MASK}, token short"


# -- the hostile set ------------------------------------------------------------------------------

def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (12000, 12000)).save(buf, "PNG")  # 144 Mpx: beyond PIL's decompression-bomb limit
    return buf.getvalue()


def _hostile_folder(tmp_path: Path, secret: Path) -> Path:
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for i, name in enumerate(["good.png", "日本語 photo.png", "UPPER.PNG", "copy_a.png", "dup.png"]):
        (images / name).write_bytes(png(i))
    (images / "copy_b.png").write_bytes((images / "copy_a.png").read_bytes())
    Image.open(io.BytesIO(png(7))).save(images / "resaved.bmp")  # same pixels as below, another file
    Image.open(io.BytesIO(png(7))).save(images / "resaved.png")
    (images / "tiny.png").write_bytes(png(8, size=(1, 1)))
    Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).save(images / "deep.png")
    Image.open(io.BytesIO(png(9))).convert("CMYK").save(images / "cmyk.jpg")
    Image.open(io.BytesIO(png(10))).convert("P").save(images / "anim.gif", save_all=True,
                                                      append_images=[Image.open(io.BytesIO(png(11))).convert("P")])
    (images / "empty.png").write_bytes(b"")
    (images / "truncated.png").write_bytes(png(12)[:40])
    (images / "text.jpg").write_text("not an image")
    (images / "bomb.png").write_bytes(_bomb())
    (images / "link.png").symlink_to(secret / "secret.png")
    (images / "hidden.png").symlink_to(secret / "secret.png")
    (images / "dirlink").symlink_to(secret, target_is_directory=True)
    (images / "loop1.png").symlink_to(images / "loop2.png")
    (images / "loop2.png").symlink_to(images / "loop1.png")
    os.mkfifo(images / "fifo.png")
    for ext in (".jpg", ".png"):
        Image.open(io.BytesIO(png(13))).save(images / f"twin{ext}")
    return images


HOSTILE_ROWS = [  # (image name, tags, kept?)
    ("good.png", "a", True), ("日本語 photo.png", "a b", True), ("UPPER.PNG", "b", True), ("tiny.png", "", True),
    ("deep.png", "c", True), ("cmyk.jpg", "a", True), ("anim.gif", "b", True), ("good", "a", False),  # same file
    ("../private/secret.png", "a", False), ("SECRET_ABS", "a", False), ("link.png", "a", False),
    ("hidden", "a", False), ("dirlink/inner.png", "a", False), ("sub/../../private/secret.png", "a", False),
    ("./../private/secret.png", "a", False), ("nul\x00.png", "a", False), ("", "a", False), ("   ", "a", False),
    ("x" * 5000 + ".png", "a", False), (".", "a", False), ("sub", "a", False), ("missing.png", "a", False),
    ("empty.png", "a", False), ("truncated.png", "a", False), ("text.jpg", "a", False), ("bomb.png", "a", False),
    ("copy_a.png", "a", True), ("copy_b.png", "a", False), ("resaved.png", "a", True), ("resaved.bmp", "a", False),
    ("dup.png", "a", True), ("dup.png", "b", False), ("loop1.png", "a", False), ("fifo.png", "a", False),
    ("twin", "a", False), ("~/x.png", "a", False), ("C:\\x.png", "a", False), ("\\\\server\\share\\x.png", "a", False),
    ("%2e%2e/private/secret.png", "a", False), ("s3://bucket/secret.png", "a", False), ("good.png", "a,b", False),
    ("good.png", "a\tb", False), ("good.png", "a|b", False), ("/dev/zero", "a", False),
]


def test_hostile_annotation_rows_are_kept_or_reported_and_nothing_outside_is_read(tmp_path, secret, opened):
    _hostile_folder(tmp_path, secret)
    rows = [(name.replace("SECRET_ABS", str(secret / "secret.png")), tags) for name, tags, _ in HOSTILE_ROWS]
    result, ws = _ingest_rows(tmp_path, rows)
    seen = set(opened)
    kept = set(pd.read_parquet(ws.manifest)["source"])
    reported = {int(r["record"].removeprefix("line ")) - 2: r["reason"] for r in read_csv_rows(ws.ingest_issues)}
    for i, (name, _, should_keep) in enumerate(HOSTILE_ROWS):
        assert (i in reported) != should_keep, (name[:40], reported.get(i))  # each row: kept or reported
        if should_keep:
            assert rows[i][0] in kept, name
    assert result.records == len(HOSTILE_ROWS) == result.accepted + result.rejected
    outside = {p.resolve() for p in secret.iterdir()} | {Path("/dev/zero")}
    assert not outside & seen, "a file outside the input was opened"


def _batch(tmp_path: Path, name: str, files: dict[str, bytes], marker: bytes | None = b"{}") -> Path:
    folder = tmp_path / "inbox" / name
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    if marker is not None:
        (folder / READY).write_bytes(marker)
    return folder


def _marker(files: dict[str, bytes], **extra) -> bytes:
    import hashlib
    return json.dumps({"files": {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}, **extra}).encode()


def test_hostile_inbox_batches_are_rejected_with_reports_and_nothing_is_lost(tmp_path, secret, opened):
    params = parse_params(tiny_params(), lineage={"raw": "started"})
    ok = {"labels.csv": b"image_name,tags\na.png,cat\n", "a.png": png(1)}
    cases = {  # batch -> (files, marker, expected words in the reason; None = accepted)
        "listed-escape": (ok, json.dumps({"files": {"../../etc/passwd": "0" * 64}}).encode(), "not a path inside"),
        "listed-absolute": (ok, json.dumps({"files": {"/etc/passwd": "0" * 64}}).encode(), "not a path inside"),
        "swapped": (ok, _marker({**ok, "a.png": png(2)}), "does not match its sha256"),
        "listed-missing": (ok, _marker({**ok, "b.png": png(3)}), "missing"),
        "not-json": (ok, b"{oops", "not a JSON object"),
        "a-list": (ok, b"[1, 2]", "not a JSON object"),
        "files-not-a-dict": (ok, b'{"files": ["a.png"]}', "must map each file"),
        "ann-escape": (ok, b'{"annotations": "../../private/x.csv"}', "leads outside the batch"),
        "images-escape": (ok, b'{"images": "/etc"}', "leads outside the batch"),
        "images-s3": (ok, b'{"images": "s3://elsewhere/x"}', "leads outside the batch"),
        "no-annotations": ({"a.png": png(4)}, b"{}", "expected one annotations file"),
        "two-annotations": ({**ok, "more.csv": b"image_name,tags\n"}, b"{}", "expected one annotations file"),
        "tsv-only": ({"labels.tsv": b"image_name\ttags\na.png\tcat\n", "a.png": png(5)}, b"{}", "expected one annotations"),
        "all-corrupt": ({"labels.csv": b"image_name,tags\na.png,cat\n", "a.png": b"junk"}, b"{}", "no usable image"),
        "bad-options": (ok, b'{"delimiter": "||"}', "invalid reading options"),
        "rows-escape": ({"labels.csv": f"image_name,tags\n../../private/secret.png,cat\n{secret}/secret.png,dog\n"
                                       "s3://b/k.png,cat\n".encode(), "a.png": png(6)}, b"{}", "no usable image"),
        "empty-marker": ({"labels.csv": b"image_name,tags\na.png,cat\n", "a.png": png(7)}, b"", None),
        "unlisted-extra": ({"labels.csv": b"image_name,tags\na.png,cat\nlate.png,dog\n", "a.png": png(8),
                            "late.png": png(9)},
                           _marker({"labels.csv": b"image_name,tags\na.png,cat\nlate.png,dog\n", "a.png": png(8)}),
                           None),
    }
    for name, (files, marker, _) in cases.items():
        _batch(tmp_path, name, files, marker)
    _batch(tmp_path, "still-arriving", ok, marker=None)
    before = {p.relative_to(tmp_path / "inbox").as_posix(): p.read_bytes()
              for p in (tmp_path / "inbox").rglob("*") if p.is_file() and p.name != READY}
    intake = take_in(params, Layout(tmp_path))
    seen = set(opened)
    reasons = {r["batch"]: r["reason"] for r in intake["rejected"]}
    for name, (_, _, words) in cases.items():
        if words is None:
            assert name in [e["batch"] for e in intake["applied"]], (name, reasons.get(name))
        else:
            assert words in reasons.get(name, ""), (name, reasons.get(name))
    late = next(e for e in intake["applied"] if e["batch"] == "unlisted-extra")
    assert [r["image"] for r in late["rejected"]] == ["late.png"]  # a file not in the marker is never read
    after = {}
    for area in ("inbox", "inbox-archive", "inbox-rejected"):
        root = tmp_path / area
        after.update({p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
                      if p.is_file() and p.name not in (READY, REPORT)})
    assert after == before  # every file of every batch is somewhere, unchanged
    assert sorted(p.name for p in (tmp_path / "inbox").iterdir()) == ["still-arriving"]
    assert not {p.resolve() for p in secret.iterdir()} & seen
    assert len(HOSTILE_ROWS) + len(cases) >= 40
