"""The retraining inbox and raw data: batches appear only when complete, are applied once,
deduplicated by content, archived or rejected with a report; stopped runs finish what they left.
Against a local folder and a real S3 endpoint (moto_server)."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from flows.retrain_steps import commit_message, plan, save_state
from multitag.config import parse_params
from multitag.inbox import READY, REPORT, BatchRejected, Inbox, read_batch, take_in
from multitag.layout import LEDGER, Layout
from multitag.lineage import update_lineage
from multitag.rawdata import RawData
from multitag.registry import Registry
from multitag.storage import open_store
from tests.conftest import ROOT, tiny_params
from tests.test_registry import _card, _model_file


def make_batch(folder: Path, rows: dict[str, str], seed: int = 0, corrupt=()) -> Path:
    """A folder of small PNGs (distinct random pixels per image name and seed) and labels.csv."""
    folder.mkdir(parents=True)
    for i, name in enumerate(rows):
        if name in corrupt:
            (folder / name).write_bytes(b"not an image")
        else:
            rng = np.random.default_rng([seed, i])
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / name)
    lines = ["image_name,tags"] + [f"{n},{t}" for n, t in rows.items()]
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def params(tmp_path, store_uri):
    """Inbox, archive and rejected areas in the store under test; raw data in the workspace."""
    base = store_uri if store_uri.startswith("s3://") else str(tmp_path / "areas")
    p = tiny_params(retrain={"inbox": f"{base}/inbox", "archive": f"{base}/archive", "rejected": f"{base}/rejected",
                             "min_new_images": 3})
    p["store"]["uri"] = f"{base}/store"
    return parse_params(p, lineage={"raw": "started"})  # the origin data set is not part of these tests


def test_batches_are_applied_once_deduplicated_and_archived(params, tmp_path):
    ws = tmp_path / "ws"
    inbox = Inbox(params, ws)
    b1, content = inbox.add(make_batch(tmp_path / "b1", {"a.png": "cat dog", "b.png": "dog", "c.png": ""}),
                            params.ingest, {}, name="b1")
    assert (b1, len(content.images)) == ("b1", 3)
    # b2 repeats a.png unchanged, relabels b.png, and brings one new image
    b2_dir = make_batch(tmp_path / "b2", {"a.png": "cat dog", "b.png": "dog bird", "x.png": "cat"}, seed=1)
    for name in ("a.png", "b.png"):
        (b2_dir / name).write_bytes((tmp_path / "b1" / name).read_bytes())
    inbox.add(b2_dir, params.ingest, {}, name="b2")
    # a batch still arriving (no marker) is left alone
    inbox.incoming.put_file("b3/labels.csv", b2_dir / "labels.csv")

    intake = take_in(params, Layout(ws))
    assert [e["batch"] for e in intake["applied"]] == ["b1", "b2"] and intake["rejected"] == []
    e1, e2 = intake["applied"]
    assert (e1["added"], e1["duplicates"], e1["new_labels"]) == (3, 0, ["cat", "dog"])
    assert (e2["added"], e2["duplicates"], e2["new_labels"]) == (1, 1, ["bird"])
    assert e2["relabelled"] == [{"image": "b.png", "before": ["dog"], "after": ["bird", "dog"]}]
    raw = RawData(ws / params.retrain.raw)
    rows = [json.loads(line) for line in (raw.root / "annotations.jsonl").read_text().splitlines()]
    assert sorted(r["labels"] for r in rows) == [[], ["bird", "dog"], ["cat"], ["cat", "dog"]]
    assert len(list((raw.root / "images").iterdir())) == 4
    assert sorted(inbox.batches()) == ["b3"]  # only the incomplete batch is left in the inbox
    report = json.loads(inbox.archive.get_bytes(f"b2/{REPORT}")[0])
    assert report["added"] == 1 and "rows" not in report
    assert inbox.archive.exists("b1/a.png") and inbox.archive.exists(f"b1/{READY}")

    # nothing new: nothing changes
    before = (raw.root / LEDGER).read_bytes()
    assert take_in(params, Layout(ws))["applied"] == []
    assert (raw.root / LEDGER).read_bytes() == before


def test_bad_batches_are_rejected_with_a_report_and_others_proceed(params, tmp_path):
    ws = tmp_path / "ws"
    inbox = Inbox(params, ws)
    good = make_batch(tmp_path / "good", {"a.png": "cat", "bad.png": "dog"}, corrupt={"bad.png"})
    inbox.add(good, params.ingest, {}, name="good")
    corrupt = make_batch(tmp_path / "corrupt", {"a.png": "cat", "b.png": "dog"}, corrupt={"a.png", "b.png"})
    with pytest.raises(BatchRejected, match="all 2 record"):  # `inbox add` refuses it at once ...
        inbox.add(corrupt, params.ingest, {}, name="corrupt")
    for f in sorted(corrupt.iterdir()):  # ... so it is dropped in by hand, marker last
        inbox.incoming.put_file(f"corrupt/{f.name}", f)
    inbox.incoming.put_bytes(f"corrupt/{READY}", b"{}")
    inbox.incoming.put_bytes("garbled/labels.csv", b"\xff\xfe not utf-8")
    inbox.incoming.put_bytes(f"garbled/{READY}", b"")
    inbox.incoming.put_file("badopts/labels.csv", good / "labels.csv")
    inbox.incoming.put_bytes(f"badopts/{READY}", b'{"delimiter": "||"}')

    intake = take_in(params, Layout(ws))
    assert [e["batch"] for e in intake["applied"]] == ["good"]
    [bad] = intake["applied"][0]["rejected"]
    assert (bad["record"], bad["image"], intake["applied"][0]["added"]) == ("line 3", "bad.png", 1)
    reasons = {r["batch"]: r["reason"] for r in intake["rejected"]}
    assert reasons["corrupt"].startswith("no usable image: all 2 record(s) rejected")
    assert "annotations unreadable" in reasons["garbled"] and "UTF-8" in reasons["garbled"]
    assert reasons["badopts"].startswith("invalid reading options in _READY.json: delimiter: ")
    for name in ("corrupt", "garbled", "badopts"):
        report = json.loads(inbox.rejected.get_bytes(f"{name}/{REPORT}")[0])
        assert report["reason"] == reasons[name]
        assert inbox.rejected.exists(f"{name}/labels.csv")  # nothing is lost
    assert [r["image"] for r in json.loads(inbox.rejected.get_bytes(f"corrupt/{REPORT}")[0])["rejected_records"]] \
        == ["a.png", "b.png"]
    assert inbox.batches() == {}


def test_a_run_stopped_midway_is_finished_without_applying_twice(params, tmp_path):
    ws = tmp_path / "ws"
    inbox = Inbox(params, ws)
    inbox.add(make_batch(tmp_path / "b1", {"a.png": "cat", "b.png": "dog"}), params.ingest, {}, name="b1")
    inbox.add(make_batch(tmp_path / "b2", {"c.png": "cat"}, seed=2), params.ingest, {}, name="b2")
    # Stopped after b1 was applied to the raw data, before it was archived ...
    raw = RawData(ws / params.retrain.raw)
    options, fingerprint = inbox.marker("b1")
    inbox.download("b1", tmp_path / "dl")
    raw.apply("b1", fingerprint, read_batch(tmp_path / "dl", options, params.ingest), "b1")
    # ... and while moving b2 to the rejected area: copied and reported, marker and one file deleted.
    for key in inbox.batches()["b2"]:
        inbox.incoming.get_file(f"b2/{key}", tmp_path / "f")
        inbox.rejected.put_file(f"b2/{key}", tmp_path / "f")
    inbox.rejected.put_bytes(f"b2/{REPORT}", b'{"reason": "test"}')
    inbox.incoming.delete(f"b2/{READY}")
    inbox.incoming.delete("b2/c.png")

    intake = take_in(params, Layout(ws))
    assert intake["applied"] == [] and [e["batch"] for e in raw.ledger()] == ["b1"]
    assert inbox.batches() == {}
    assert json.loads(inbox.archive.get_bytes(f"b1/{REPORT}")[0])["added"] == 2
    assert inbox.archive.exists("b1/a.png") and inbox.rejected.exists("b2/c.png")
    assert json.loads(inbox.rejected.get_bytes(f"b2/{REPORT}")[0]) == {"reason": "test"}


def test_plan_waits_for_enough_images_then_fine_tunes_or_trains_afresh(params, tmp_path):
    ws = tmp_path / "ws"
    inbox = Inbox(params, ws)
    assert plan(params, Layout(ws))["reason"].startswith("no raw data yet")
    inbox.add(make_batch(tmp_path / "b1", {"a.png": "a b", "b.png": "c"}), params.ingest, {}, name="b1")
    take_in(params, Layout(ws))
    p = plan(params, Layout(ws))
    assert (p["train"], p["new_images"]) == (False, 2) and "fewer than retrain.min_new_images (3)" in p["reason"]
    assert plan(params, Layout(ws), force=True)["train"] is True
    inbox.add(make_batch(tmp_path / "b2", {"c.png": "a"}, seed=2), params.ingest, {}, name="b2")
    take_in(params, Layout(ws))
    p = plan(params, Layout(ws))
    assert (p["train"], p["init_from"], p["reason"]) == (True, None, "training from scratch: no champion yet")

    registry = Registry(open_store(params.store.uri, ws), params.register.name)
    registry.register({"model.pt": _model_file(tmp_path / "1.pt", 1)}, _card(0.8))  # labels a, b, c
    p = plan(params, Layout(ws))
    assert (p["init_from"], p["champion"], p["champion_map"], p["new_labels"]) == (1, 1, 0.8, [])
    assert p["reason"] == "fine-tuning from champion v1 (label vocabulary unchanged)"
    # the arrow compares the champion re-scored on the candidate's test set, as the register stage did
    assert commit_message(p, {"test_map": 0.85, "version": 2, "champion": True, "champion_map": 0.81}) == \
        "retrain: +3 images, mAP 0.8100 → 0.8500 (v2 promoted)"
    # as many decimals as show the difference that decided (0.9998 → 1.0000 is not "1.000 → 1.000")
    assert commit_message(p, {"test_map": 0.5, "compared_map": 1.0, "version": 3, "champion": True,
                              "champion_map": 0.99998}).endswith("mAP 0.99998 → 1.00000 (v3 promoted)")

    save_state(Layout(ws), {"trained": ["b1", "b2"]})
    assert plan(params, Layout(ws))["reason"] == "no new images since the last training"
    inbox.add(make_batch(tmp_path / "b3", {"d.png": "zebra", "e.png": "a", "f.png": "b"}, seed=3),
              params.ingest, {}, name="b3")
    take_in(params, Layout(ws))
    p = plan(params, Layout(ws))
    assert (p["train"], p["init_from"], p["new_labels"]) == (True, None, ["zebra"])
    assert p["reason"] == "training from scratch: new label(s) ['zebra']"


def test_inbox_add_refuses_a_bad_folder_and_a_taken_name(params, tmp_path):
    inbox = Inbox(params, tmp_path / "ws")
    folder = make_batch(tmp_path / "b", {"a.png": "cat"})
    (folder / "more.csv").write_text("image_name,tags\n")
    with pytest.raises(BatchRejected, match=r"expected one annotations file .* found \['labels.csv', 'more.csv'\]"):
        inbox.add(folder, params.ingest, {})
    inbox.add(folder, params.ingest, {"annotations": "labels.csv"}, name="b")
    with pytest.raises(FileExistsError, match="'b' already exists"):
        inbox.add(folder, params.ingest, {"annotations": "labels.csv"}, name="b")
    with pytest.raises(BatchRejected, match="missing column"):
        inbox.add(folder, params.ingest, {"annotations": "labels.csv", "tags_column": "labels"}, name="c")
    assert sorted(inbox.batches()) == ["b"]


def test_lineage_file_records_and_reloads(tmp_path):
    ws = Layout(tmp_path)
    ws.params.write_text((ROOT / "params.yaml").read_text())
    params = parse_params(yaml.safe_load(ws.params.read_text()))
    before = ws.params.read_bytes()
    params = update_lineage(ws, params, init_from=3, store="s3://b/p")
    assert (params.lineage.init_from, params.store.uri) == (3, "s3://b/p")
    assert ws.params.read_bytes() == before  # params.yaml stays as the user wrote it
    assert ws.lineage.read_text().startswith("# Written by multitag")
    assert yaml.safe_load(ws.lineage.read_text())["lineage"]["init_from"] == 3
