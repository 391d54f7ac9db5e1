"""Image files people really have: odd modes, rotations, broken and hostile files."""

import csv
import io
import struct
import zlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from multitag.config import IngestParams
from multitag.errors import RecordError
from multitag.images import decode
from multitag.ingest import ingest
from multitag.layout import Layout


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _bomb_png(width=100_000, height=100_000) -> bytes:
    """A valid PNG header claiming enormous dimensions (a decompression bomb)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _rgb(seed, size=(24, 16)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _exif_rotated() -> bytes:
    """Stored 32 wide x 16 high, left half red, right half blue, with EXIF orientation 6 (display
    rotated 90 degrees clockwise): upright, the top is red and the bottom blue."""
    arr = np.zeros((16, 32, 3), dtype=np.uint8)
    arr[:, :16] = (255, 0, 0)
    arr[:, 16:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(Image.fromarray(arr), "JPEG", exif=exif, quality=95)


CASES = {  # file -> (bytes, reason words if rejected, else None)
    "truncated.jpg": (_save(_rgb(1, (64, 64)), "JPEG")[:300], "corrupt or truncated"),
    "zero.jpg": (b"", "zero-byte"),
    "text.jpg": (b"just some text, not a picture\n", "not a readable image"),
    "bomb.png": (_bomb_png(), "dimensions are too large"),
    "sixteen.png": (_save(Image.fromarray((np.arange(24 * 16).reshape(16, 24) * 100).astype(np.uint16)), "PNG"), None),
    "cmyk.jpg": (_save(Image.new("CMYK", (24, 16), (0, 255, 255, 0)), "JPEG"), None),
    "palette.png": (_save(_rgb(2).convert("P"), "PNG"), None),
    "la.png": (_save(_rgb(3).convert("LA"), "PNG"), None),
    "rgba.png": (_save(_rgb(4).convert("RGBA"), "PNG"), None),
    "rotated.jpg": (_exif_rotated(), None),
    "plain.png": (_save(_rgb(5), "PNG"), None),
    "plain_resaved.png": (_save(_rgb(5), "PNG", compress_level=9), "same pixels in another file"),
}


def test_every_kind_of_image_file(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name, (data, _) in CASES.items():
        (images / name).write_bytes(data)
    ann = tmp_path / "a.csv"
    with ann.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_name", "tags"])
        w.writerows((name, "x") for name in CASES)
    p = IngestParams(annotations=str(ann), images=str(images), image_size=16)
    result = ingest(p, Layout(tmp_path))
    with Layout(tmp_path).ingest_issues.open() as f:
        issues = {r["image"]: r["reason"] for r in csv.DictReader(f)}
    rejected = {n: words for n, (_, words) in CASES.items() if words}
    assert _save(_rgb(5), "PNG") != CASES["plain_resaved.png"][0]  # different bytes, same pixels
    assert set(issues) == set(rejected)
    for name, words in rejected.items():
        assert words in issues[name], (name, issues[name])
    kept = set(pd.read_parquet(Layout(tmp_path).manifest)["source"])
    assert kept == set(CASES) - set(rejected) and result.accepted == len(kept)


def test_exif_orientation_is_applied():
    arr = decode(_exif_rotated(), 16)
    top, bottom = arr[:4].reshape(-1, 3).mean(0), arr[-4:].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 60  # red on top
    assert bottom[2] > 200 and bottom[0] < 60  # blue below


def test_modes_become_rgb_with_sensible_values():
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 0))  # fully transparent: shown as white
    assert (decode(_save(rgba, "PNG"), 8) == 255).all()
    sixteen = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    out = decode(_save(sixteen, "PNG"), 8)
    assert out.shape == (8, 8, 3) and (out == 255).all()  # full-scale 16-bit stays full scale
    cmyk = decode(_save(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "JPEG"), 8)
    assert cmyk.mean() > 240  # no ink: white


def test_bomb_is_refused_before_decoding():
    with pytest.raises(RecordError, match="too large"):
        decode(_bomb_png(), 16)
