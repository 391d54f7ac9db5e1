"""Artifact store: keys ('a/b/c.json') mapped onto a local folder.

The interface carries what the registry needs to stay safe under concurrency: conditional writes
(``if_none_match`` = create only if absent, ``if_match`` = replace only if unchanged since read),
the same semantics as S3's ``If-None-Match: *`` / ``If-Match: <etag>``.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from multitag.config import ConfigError


class PreconditionFailed(Exception):
    """A conditional write lost: the key exists (if_none_match) or changed (if_match)."""


class NotFound(LookupError):
    pass


def _etag(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


class LocalStore:
    """A folder as an artifact store; every write is atomic (temporary file, then rename)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        parts = PurePosixPath(key).parts
        if not parts or key.startswith("/") or ".." in parts:
            raise ValueError(f"invalid store key {key!r}")
        return self.root.joinpath(*parts)

    def url(self, key: str) -> str:
        return self._path(key).as_uri()

    @contextmanager
    def _locked(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _write_tmp(self, path: Path, data: bytes) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return Path(tmp)

    def put_bytes(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        path = self._path(key)
        tmp = self._write_tmp(path, data)
        try:
            if if_none_match:
                try:
                    os.link(tmp, path)  # atomic create-if-absent
                except FileExistsError:
                    raise PreconditionFailed(f"{key} already exists") from None
            elif if_match is not None:
                with self._locked(path):
                    if not path.exists() or _etag(path.read_bytes()) != if_match:
                        raise PreconditionFailed(f"{key} changed since it was read")
                    os.replace(tmp, path)
            else:
                os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return _etag(data)

    def put_file(self, key: str, src: str | Path) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        os.close(fd)
        shutil.copyfile(src, tmp)
        os.replace(tmp, path)

    def get_bytes(self, key: str) -> tuple[bytes, str]:
        """(content, etag); NotFound if absent."""
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(key) from None
        return data, _etag(data)

    def get_file(self, key: str, dest: str | Path) -> None:
        path = self._path(key)
        if not path.is_file():
            raise NotFound(key)
        shutil.copyfile(path, dest)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        """Keys under ``prefix`` (a folder-like prefix ending in '/'), sorted."""
        base = self._path(prefix.rstrip("/"))
        if not base.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*")
                      if p.is_file() and not p.name.startswith(".") and not p.name.endswith(".lock"))


def open_store(uri: str, workspace: str | Path = ".") -> LocalStore:
    """The store for ``store.uri``: a local folder (relative to the workspace) for now."""
    if "://" in uri and not uri.startswith("file://"):
        raise ConfigError(f"store.uri: {uri!r} is not supported yet; use a local folder path")
    path = Path(uri.removeprefix("file://"))
    return LocalStore(path if path.is_absolute() else Path(workspace) / path)
