"""Image decoding shared by ingestion and prediction: one function, so a model sees at prediction
time exactly the pixels it was trained on."""

from __future__ import annotations

import hashlib
import io
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from multitag.errors import RecordError

_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
DECODE_VERSION = 1  # bump when decode() changes its output: cached decodes of older versions are ignored


def resolve_image(root: Path, name: str) -> Path:
    """The file for ``name`` inside ``root``, refusing paths that escape it (``..``, absolute
    paths, symlinks pointing outside)."""
    if not name or not name.strip():
        raise RecordError("empty image name")
    if "\x00" in name:
        raise RecordError(f"image name {name!r} contains a NUL character")
    if Path(name).is_absolute():
        raise RecordError(f"absolute path {name!r} refused: image paths must be relative to the image folder")
    root = root.resolve()
    try:
        path = (root / name).resolve()
    except (OSError, RuntimeError) as err:  # a name too long, a symlink loop
        raise RecordError(f"image path {name!r} cannot be resolved: {err}") from None
    if not path.is_relative_to(root):
        raise RecordError(f"path {name!r} leads outside the image folder {root}")
    return path


_s3_stores: dict = {}


def read_s3(uri: str) -> bytes:
    """Bytes of s3://bucket/key (credentials and endpoint from the standard AWS sources). A missing
    key rejects the record; bucket, credential and endpoint problems (StoreError) fail the run."""
    import os

    from multitag.errors import NotFound
    from multitag.storage import S3Store

    bucket, _, key = uri.removeprefix("s3://").partition("/")
    store_id = (os.environ.get("AWS_ENDPOINT_URL"), bucket)
    if store_id not in _s3_stores:  # one client per (worker) process, endpoint and bucket
        _s3_stores[store_id] = S3Store(f"s3://{bucket}")
    try:
        data, _ = _s3_stores[store_id].get_bytes(key)
    except ValueError:
        raise RecordError(f"invalid S3 image location {uri!r}") from None
    except NotFound:
        raise RecordError(f"image not found: {uri}") from None
    if not data:
        raise RecordError(f"empty (zero-byte) file: {uri}")
    return data


def read_bytes(path: Path) -> bytes:
    """A local image's bytes; anything that keeps this one file from being read is the record's problem.
    Only regular files are read (a FIFO or a device would block or never end)."""
    try:
        if path.exists() and not path.is_dir() and not stat.S_ISREG(path.stat().st_mode):
            raise RecordError(f"not a regular file: {path}")
        data = path.read_bytes()
    except FileNotFoundError:
        raise RecordError(f"image file not found: {path}") from None
    except IsADirectoryError:
        raise RecordError(f"not a file: {path}") from None
    except PermissionError:
        raise RecordError(f"cannot read {path}: permission denied") from None
    except OSError as err:
        raise RecordError(f"cannot read {path}: {err.strerror or err}") from None
    if not data:
        raise RecordError(f"empty (zero-byte) file: {path}")
    return data


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


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in _SIXTEEN_BIT:
        arr = np.asarray(img, dtype=np.float32)
        img = Image.fromarray(np.clip(arr / 257.0, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels carry arbitrary colour values; show them as white, like a viewer.
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def decode(data: bytes, size: int, name: str = "image") -> np.ndarray:
    """Decode image bytes to an upright (EXIF orientation applied) RGB uint8 array of
    ``size`` x ``size``. Raises RecordError for anything that is not a readable image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, much faster
            img.load()
            img = ImageOps.exif_transpose(img)
            img = _to_rgb(img).resize((size, size), Image.BILINEAR)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise RecordError(f"{name}: refused, image dimensions are too large ({err})") from None
    except UnidentifiedImageError:
        raise RecordError(f"{name}: not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise RecordError(f"{name}: corrupt or truncated image ({err})") from None
    return np.asarray(img, dtype=np.uint8)
