"""One test suite for both stores (local folder, S3 over HTTP on moto_server), plus what only a
remote store can do wrong: a missing bucket, an endpoint that is down or goes away mid-upload."""

import pytest
import torch

from multitag.errors import is_transient
from multitag.models import build_model, save_model_file
from multitag.registry import Registry
from multitag.errors import NotFound, PreconditionFailed, StoreError, StoreUnavailable
from multitag.storage import S3Store, open_store
from tests.conftest import free_port
from tests.tcp_proxy import TcpProxy


def test_store_round_trip_and_conditional_writes(store_uri, tmp_path):
    store = open_store(store_uri)
    etag = store.put_bytes("k/a.json", b"1", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        store.put_bytes("k/a.json", b"2", if_none_match=True)
    new = store.put_bytes("k/a.json", b"3", if_match=etag)
    with pytest.raises(PreconditionFailed):
        store.put_bytes("k/a.json", b"4", if_match=etag)  # stale etag
    assert store.get_bytes("k/a.json") == (b"3", new)

    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 100_000)
    store.put_file("k/sub/file.bin", src)
    store.get_file("k/sub/file.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()
    assert store.list("k/") == ["k/a.json", "k/sub/file.bin"]
    assert store.exists("k/a.json") and not store.exists("k/none")
    with pytest.raises(NotFound):
        store.get_bytes("k/none")
    with pytest.raises(ValueError):
        store.put_bytes("../escape", b"x")


def test_missing_bucket_is_named(s3_bucket):
    store = S3Store(f"s3://{s3_bucket}-absent/p")
    with pytest.raises(StoreError, match=rf"{s3_bucket}-absent.*does not exist") as err:
        store.put_bytes("a.json", b"{}")
    assert not is_transient(err.value)


def test_unreachable_endpoint_is_transient_and_named(s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    store = S3Store(f"s3://{s3_bucket}/p")
    with pytest.raises(StoreUnavailable, match=rf"S3 get s3://{s3_bucket}/p/x.json: cannot reach the endpoint") as err:
        store.get_bytes("x.json")
    assert is_transient(err.value)


def test_endpoint_gone_mid_upload_leaves_no_partial_version(s3_bucket, moto_endpoint, monkeypatch, tmp_path):
    torch.manual_seed(0)
    model = tmp_path / "model.pt"
    save_model_file(model, arch="simple_cnn", labels=["a"], image_size=8,
                    state_dict=build_model("simple_cnn", 1, 8).state_dict())
    card = {"labels": ["a"], "thresholds": [0.5], "test_set": "T", "metrics": {"test": {"map": 0.9}},
            "params": {"train": {"model": "simple_cnn"}}, "git": {"commit": None, "dirty": None}}
    proxy = TcpProxy(int(moto_endpoint.rsplit(":", 1)[1]), cut_when=b"model.pt")
    proxy.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    registry = Registry(S3Store(f"s3://{s3_bucket}/reg"), "m")
    with pytest.raises(StoreUnavailable, match=rf"S3 upload s3://{s3_bucket}/reg/registry/m/versions/000001/model.pt"):
        registry.register({"model.pt": model}, card)
    assert proxy.cut_happened.is_set()

    proxy.start()  # the endpoint is back: the same registration succeeds
    result = registry.register({"model.pt": model}, card)
    assert result.created and result.champion and result.version == 2  # the dead attempt's number is not reused
    assert [v["version"] for v in registry.versions()] == [2]  # no partial version 1
    registry.download_model("champion", tmp_path / "back.pt")  # complete, checksum verified
    proxy.stop()


def test_large_files_go_up_in_parts_and_come_back_intact(s3_bucket, tmp_path):
    from boto3.s3.transfer import TransferConfig

    store = S3Store(f"s3://{s3_bucket}/big")
    store.transfer = TransferConfig(multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20)  # S3's minimum part
    src = tmp_path / "big.bin"
    src.write_bytes(bytes(range(256)) * (11 * 2**20 // 256))  # 11 MiB -> 3 parts
    store.put_file("model.pt", src)
    etag = store.s3.head_object(Bucket=s3_bucket, Key="big/model.pt")["ETag"]
    assert etag.strip('"').endswith("-3")  # a multipart upload's ETag counts its parts
    store.get_file("model.pt", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()
