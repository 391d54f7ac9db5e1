"""Artifact store: keys ('a/b/c.json') mapped onto a local folder or an S3 bucket prefix.

Both stores share one interface, including what the registry needs to stay safe under
concurrency: conditional writes (``if_none_match`` = create only if absent, ``if_match`` = replace
only if unchanged since read), i.e. S3's ``If-None-Match: *`` / ``If-Match: <etag>``.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from multitag.errors import ConfigError, NotFound, PreconditionFailed, StoreError, StoreUnavailable


def _check_key(key: str) -> PurePosixPath:
    parts = PurePosixPath(key).parts
    if not parts or key.startswith("/") or ".." in parts:
        raise ValueError(f"invalid store key {key!r}")
    return PurePosixPath(*parts)


def _etag(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


class LocalStore:
    """A folder as an artifact store; every write is atomic (temporary file, then rename). A file
    system error (read-only, full, permission denied) is a StoreError naming the path and the cause."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.uri = str(self.root)

    @contextmanager
    def _fs(self, op: str, key: str):
        try:
            yield
        except (FileNotFoundError, NotFound, PreconditionFailed):
            raise
        except OSError as err:
            where = err.filename or (self._path(key) if key else self.root)
            raise StoreError(f"local store: cannot {op} {where}: {err.strerror or err}") from None

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*_check_key(key).parts)

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
        with self._fs("write", key):
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
        with self._fs("write", key):
            path = self._path(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            os.close(fd)
            try:
                shutil.copyfile(src, tmp)
                os.replace(tmp, path)
            finally:
                Path(tmp).unlink(missing_ok=True)

    def get_bytes(self, key: str) -> tuple[bytes, str]:
        """(content, etag); NotFound if absent."""
        with self._fs("read", key):
            try:
                data = self._path(key).read_bytes()
            except FileNotFoundError:
                raise NotFound(key) from None
            return data, _etag(data)

    def get_file(self, key: str, dest: str | Path) -> None:
        with self._fs("read", key):
            path = self._path(key)
            if not path.is_file():
                raise NotFound(key)
            shutil.copyfile(path, dest)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        """Remove ``key`` (absent is fine) and the folders it leaves empty."""
        with self._fs("delete", key):
            path = self._path(key)
            path.unlink(missing_ok=True)
            for parent in path.parents:
                if parent == self.root or not parent.is_relative_to(self.root):
                    break
                try:
                    parent.rmdir()
                except OSError:
                    break

    def _walk(self, prefix: str):
        base = self._path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        if not base.is_dir() or base.is_symlink():
            return []
        return [p for p in base.rglob("*") if not p.name.startswith(".") and not p.name.endswith(".lock")]

    def list(self, prefix: str = "") -> list[str]:
        """Keys under ``prefix`` (a folder-like prefix ending in '/'; "" = everything), sorted. Symbolic
        links are not keys: a store never reads through one (see ``links``)."""
        return sorted(p.relative_to(self.root).as_posix() for p in self._walk(prefix)
                      if p.is_file() and not p.is_symlink())

    def links(self, prefix: str = "") -> list[str]:
        """Symbolic links under ``prefix`` (a folder dropped into a local inbox may hold some)."""
        return sorted(p.relative_to(self.root).as_posix() for p in self._walk(prefix) if p.is_symlink())


class S3Store:
    """An S3 bucket prefix as an artifact store, through boto3.

    Credentials and endpoint come from the standard AWS sources (environment, profile, instance
    role; ``AWS_ENDPOINT_URL`` for MinIO or any S3-compatible store). botocore's standard retry
    mode retries throttling, 5xx and connection errors; files above 64 MiB go up in parts.
    """

    def __init__(self, uri: str):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        rest = uri.removeprefix("s3://")
        self.bucket, _, prefix = rest.partition("/")
        if not self.bucket:
            raise ConfigError(f"store.uri: {uri!r} names no bucket (expected s3://bucket/prefix)")
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.s3 = boto3.client("s3", config=Config(retries={"mode": "standard", "max_attempts": 5},
                                                   connect_timeout=5, read_timeout=60))
        self.endpoint = self.s3.meta.endpoint_url
        self.transfer = TransferConfig(multipart_threshold=64 * 2**20, multipart_chunksize=16 * 2**20)

    def _key(self, key: str) -> str:
        key = str(_check_key(key))
        return f"{self.prefix}/{key}" if self.prefix else key

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    @contextmanager
    def _op(self, op: str, key: str):
        """Translate botocore errors into one-paragraph StoreErrors naming op, bucket and key."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import (BotoCoreError, ClientError, ConnectionError as BotoConnectionError,
                                         NoCredentialsError, PartialCredentialsError)

        where = f"S3 {op} {self.url(key) if key.strip('/') else self.uri}"
        try:
            yield
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise PreconditionFailed(f"{where}: {code}") from None
            if code in ("NoSuchKey", "404", "NotFound"):
                raise NotFound(f"{where}: no such key") from None
            if code == "NoSuchBucket":
                raise StoreError(f"{where}: bucket {self.bucket!r} does not exist at {self.endpoint} "
                                 "(create it, or fix store.uri / AWS_ENDPOINT_URL)") from None
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
                raise StoreError(f"{where}: access denied ({code}); check the AWS credentials "
                                 "and the bucket policy") from None
            if status >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout"):
                raise StoreUnavailable(f"{where}: the service is failing ({code or status}) after retries; "
                                       "try again later") from None
            raise StoreError(f"{where}: {code or status}: {err.response.get('Error', {}).get('Message', '')}") from None
        except (NoCredentialsError, PartialCredentialsError):
            raise StoreError(f"{where}: no usable AWS credentials; set AWS_ACCESS_KEY_ID and "
                             "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or use an instance role") from None
        except S3UploadFailedError as err:  # boto3's transfer manager wraps the underlying error
            text = str(err)
            if "connect" not in text.lower() and "timeout" not in text.lower():
                raise StoreError(f"{where}: {text}") from None
            raise StoreUnavailable(f"{where}: cannot reach the endpoint {self.endpoint}; "
                                   "check AWS_ENDPOINT_URL and that the service is up") from None
        except BotoConnectionError as err:
            raise StoreUnavailable(f"{where}: cannot reach the endpoint {self.endpoint} ({type(err).__name__}); "
                                   "check AWS_ENDPOINT_URL and that the service is up") from None
        except BotoCoreError as err:
            raise StoreError(f"{where}: {type(err).__name__}") from None

    def put_bytes(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        extra = {"IfNoneMatch": "*"} if if_none_match else {"IfMatch": if_match} if if_match else {}
        with self._op("put", key):
            return self.s3.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **extra)["ETag"]

    def put_file(self, key: str, src: str | Path) -> None:
        with self._op("upload", key):
            self.s3.upload_file(str(src), self.bucket, self._key(key), Config=self.transfer)

    def get_bytes(self, key: str) -> tuple[bytes, str]:
        with self._op("get", key):
            r = self.s3.get_object(Bucket=self.bucket, Key=self._key(key))
            return r["Body"].read(), r["ETag"]

    def get_file(self, key: str, dest: str | Path) -> None:
        with self._op("download", key):
            self.s3.download_file(self.bucket, self._key(key), str(dest), Config=self.transfer)

    def exists(self, key: str) -> bool:
        try:
            with self._op("head", key):
                self.s3.head_object(Bucket=self.bucket, Key=self._key(key))
        except NotFound:
            return False
        return True

    def delete(self, key: str) -> None:
        with self._op("delete", key):
            self.s3.delete_object(Bucket=self.bucket, Key=self._key(key))

    def links(self, prefix: str = "") -> list[str]:
        return []  # S3 has no symbolic links

    def list(self, prefix: str = "") -> list[str]:
        if prefix.strip("/"):
            full = self._key(prefix.rstrip("/")) + "/"
        else:
            full = f"{self.prefix}/" if self.prefix else ""
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys = []
        with self._op("list", prefix):
            for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                keys += [o["Key"][strip:] for o in page.get("Contents", [])]
        return sorted(keys)


Store = LocalStore | S3Store


def open_store(uri: str, workspace: str | Path = ".") -> Store:
    """The store for ``store.uri``: ``s3://bucket/prefix``, or a local folder (relative to the workspace)."""
    if uri.startswith("s3://"):
        return S3Store(uri)
    if "://" in uri and not uri.startswith("file://"):
        raise ConfigError(f"store.uri: unsupported scheme in {uri!r}; use s3://bucket/prefix or a folder path")
    path = Path(uri.removeprefix("file://"))
    return LocalStore(path if path.is_absolute() else Path(workspace) / path)
