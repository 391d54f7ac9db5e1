"""Misuse and wrong models: a wrong setting, file or command gets a clear message naming the
problem, nothing is lost, and a model that cannot be compared with the champion never replaces it."""

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from multitag.champion import comparer
from multitag.config import load_params, parse_params
from multitag.errors import BatchRejected, ConfigError, StoreError
from multitag.evaluate import evaluate
from multitag.inbox import Inbox
from multitag.labels import make_labels
from multitag.layout import Layout
from multitag.models import build_model, save_model_file
from multitag.registry import Registry
from multitag.storage import LocalStore, open_store
from multitag.train import train
from tests.conftest import BIN, ROOT, run, tiny_params
from tests.test_registry import _card
from tests.test_train import _params


@pytest.mark.parametrize("section, values, key", [
    ("train", {"epochs": True}, "train.epochs"),
    ("train", {"lr": "0.1"}, "train.lr"),
    ("train", {"model": "resnet19"}, "train.model"),
    ("train", {"device": "gpu"}, "train.device"),
    ("ingest", {"test_fraction": 0}, "ingest.test_fraction"),
    ("ingest", {"val_fraction": 0}, "ingest.val_fraction"),
    ("ingest", {"image_size": "32"}, "ingest.image_size"),
    ("train", {"augment": {"crop_scale": [0.9, 0.1]}}, "train.augment.crop_scale"),
])
def test_wrong_settings_fail_when_params_are_loaded(section, values, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_params({section: values})


def test_a_diverging_run_fails_naming_the_setting(data):
    with pytest.raises(ValueError, match=r"train: the (loss became|model's outputs became) .*train\.lr"):
        train(_params(lr=1e12, epochs=2), data)
    assert not data.model.exists()  # nothing registered, nothing written as a model


def test_the_champion_is_replaced_only_by_a_model_of_the_same_labels(data, tmp_path):
    train(_params(epochs=2), data)
    evaluate(parse_params({}).evaluate, data)
    registry = Registry(LocalStore(tmp_path / "store"), "m")
    compare = comparer(registry, data, ["a", "b", "c"])
    card = {"labels": ["a", "b", "c"], "test_set": "T", "metrics": json.loads(data.metrics.read_text())}

    def champion(labels, seed):
        torch.manual_seed(seed)
        path = tmp_path / f"champ{seed}.pt"
        save_model_file(path, arch="simple_cnn", labels=labels, image_size=16,
                        state_dict=build_model("simple_cnn", len(labels), 16).state_dict())
        r = registry.register({"model.pt": path}, {**_card(0.99, "other"), "labels": labels,
                                                   "thresholds": [0.5] * len(labels)})
        return json.loads(registry.store.get_bytes(registry.version_key(r.version, "version.json"))[0])

    wider = compare(card, champion(["a", "b", "c", "d"], 1))  # knows a label this model lacks
    assert not wider.comparable and "knows labels this model lacks (d)" in wider.note
    narrower = compare(card, champion(["a", "b"], 2))  # this model adds c: compared on a and b
    assert narrower.comparable and "both on the 2 labels the champion knows (1 new left out)" in narrower.note
    ap = {r["label"]: float(r["ap"]) for r in __import__("csv").DictReader(data.per_label.open())}
    assert narrower.candidate_map == pytest.approx((ap["a"] + ap["b"]) / 2, abs=1e-4)  # the CSV has 4 decimals
    assert set(narrower.buckets) == {"head", "medium", "tail"}
    assert 0 <= narrower.champion_map <= 1 and "re-scored on this test set" in narrower.note


def test_thresholds_of_another_model_are_refused(tmp_path):
    from multitag.predict import predict_folder

    save_model_file(tmp_path / "m.pt", arch="simple_cnn", labels=["a", "b"], image_size=8,
                    state_dict=build_model("simple_cnn", 2, 8).state_dict())
    (tmp_path / "t.json").write_text(json.dumps({"labels": ["a", "b", "c"], "thresholds": [0.5, 0.5, 0.5]}))
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "x.png")
    with pytest.raises(ValueError, match="3 thresholds for labels .*the model has 2 labels"):
        predict_folder(tmp_path / "imgs", str(tmp_path / "m.pt"), LocalStore(tmp_path / "s"), "m",
                       tmp_path / "p.csv", str(tmp_path / "t.json"))


def test_predict_refuses_what_it_cannot_do_in_one_line(tmp_path):
    save_model_file(tmp_path / "m.pt", arch="simple_cnn", labels=["a"], image_size=8,
                    state_dict=build_model("simple_cnn", 1, 8).state_dict())
    torch.save(build_model("simple_cnn", 1, 8), tmp_path / "pickled.pt")  # a whole pickled module
    for folder, files in {"empty": {}, "corrupt": {"a.png": b"junk", "b.jpg": b""}, "ok": {"a.png": None}}.items():
        (tmp_path / folder).mkdir()
        for name, data in files.items():
            if data is None:
                Image.new("RGB", (8, 8)).save(tmp_path / folder / name)
            else:
                (tmp_path / folder / name).write_bytes(data)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    cases = [(["empty", "--model", "m.pt"], "no image files"),
             (["corrupt", "--model", "m.pt"], "none of the 2 image files"),
             (["ok", "--model", "missing.pt"], "model file not found: missing.pt"),
             (["ok", "--model", "pickled.pt"], "refused: loading it would run pickled code")]
    for args, message in cases:
        proc = run([str(BIN / "multitag"), "predict", *args, "--out", "p.csv"], tmp_path, check=False)
        assert proc.returncode == 1 and message in proc.stderr, (args, proc.stderr[-500:])
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 3, proc.stderr
    assert "a.png" in (tmp_path / "p.csv").read_text()  # the corrupt folder's rows were written: nothing lost


def test_a_temporary_prefect_server_that_cannot_start_is_one_line(tmp_path):
    """No PREFECT_API_URL, and Prefect's database cannot be created: the run stops when the server
    does (not after the 120 s startup wait), saying what to do instead."""
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    bad_db = f"sqlite+aiosqlite:///{tmp_path / 'no-such-folder' / 'prefect.db'}"
    proc = run([str(BIN / "multitag"), "run"], tmp_path, check=False, timeout=90,
               env={"PREFECT_API_URL": "", "PREFECT_API_DATABASE_CONNECTION_URL": bad_db})
    assert proc.returncode == 1, proc.stderr[-2000:]
    [line] = [x for x in proc.stderr.splitlines() if "ERROR multitag" in x]
    assert "temporary API server did not start (exit status 3" in line and "multitag server" in line


def test_a_store_that_cannot_be_written_is_one_line(tmp_path):
    (tmp_path / "store/registry/m").mkdir(parents=True)
    (tmp_path / "store/registry/m/versions").write_text("a file where a folder must be written")
    registry = Registry(open_store("store", tmp_path), "m")
    with pytest.raises(StoreError, match=r"local store: cannot write .*store/registry/m/versions: (File exists|Not a directory)"):
        registry.register({"model.pt": _model(tmp_path)}, _card(0.5))


def _model(tmp_path):
    save_model_file(tmp_path / "m.pt", arch="simple_cnn", labels=["a"], image_size=8,
                    state_dict=build_model("simple_cnn", 1, 8).state_dict())
    return tmp_path / "m.pt"


def test_a_damaged_champion_is_reported_and_not_served(tmp_path):
    registry = Registry(LocalStore(tmp_path / "store"), "m")
    registry.register({"model.pt": _model(tmp_path)}, _card(0.5))
    (tmp_path / "store/registry/m/versions/000001/version.json").unlink()
    assert registry.versions() == [] and registry.incomplete() == [1]
    with pytest.raises(StoreError, match="champion v1 is damaged: its version record .* is missing"):
        registry.resolve("champion")
    params = tiny_params(register={"name": "m"})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    listing = run([str(BIN / "multitag"), "models", "list"], tmp_path).stdout
    assert "*       1  incomplete or damaged" in listing
    proc = run([str(BIN / "multitag"), "predict", str(tmp_path), "--model", "champion"], tmp_path, check=False)
    assert proc.returncode == 1 and "damaged" in proc.stderr and "Traceback" not in proc.stderr


def test_inbox_refuses_bad_names_and_unreadable_formats_up_front(tmp_path):
    params = parse_params(tiny_params())
    inbox = Inbox(params, tmp_path)
    folder = tmp_path / "batch"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    (folder / "labels.tsv").write_text("image_name\ttags\na.png\tcat\n")
    with pytest.raises(BatchRejected, match="batch name 'a/b' refused"):
        inbox.add(folder, params.ingest, {}, name="a/b")
    with pytest.raises(BatchRejected, match=r"expected one annotations file \(.csv, .jsonl, .ndjson, .json\)"):
        inbox.add(folder, params.ingest, {}, name="ok")
    assert inbox.batches() == {}  # nothing left half-added


def test_coco_orphans_are_reported_and_an_all_negative_data_set_has_its_report(tmp_path):
    from multitag.config import IngestParams
    from multitag.ingest import ingest
    from multitag.report import read_csv_rows

    (tmp_path / "images").mkdir()
    for i in range(6):
        Image.fromarray(np.full((8, 8, 3), i * 40, np.uint8)).save(tmp_path / "images" / f"{i}.png")
    coco = {"images": [{"id": i, "file_name": f"{i}.png"} for i in range(6)], "categories": [{"id": 1, "name": "cat"}],
            "annotations": [{"image_id": 77, "category_id": 1}]}  # an image id with no entry
    (tmp_path / "c.json").write_text(json.dumps(coco))
    ws = Layout(tmp_path / "ws")
    ingest(IngestParams(annotations=str(tmp_path / "c.json"), images=str(tmp_path / "images"), image_size=8), ws)
    [orphan] = read_csv_rows(ws.ingest_issues)
    assert orphan["record"] == "annotations[0]" and "image_id 77, which has no entry in images" in orphan["reason"]
    result = make_labels(ws)  # every image a negative: the report and a plot saying so
    assert result.labels == 0 and ws.label_stats_plot.stat().st_size > 0
    assert json.loads(ws.label_stats.read_text())["images"] == 6
    with pytest.raises(ValueError, match="nothing to learn"):
        train(_params(), ws)


def test_params_yaml_and_a_missing_lineage_file(tmp_path):
    (tmp_path / "params.yaml").write_text("train:\n  epochs: 3\n")
    assert load_params(tmp_path / "params.yaml").lineage.raw is None  # no lineage.yaml: a fresh lineage
    (tmp_path / "lineage.yaml").write_text("other: 1\n")
    with pytest.raises(ConfigError, match="expected one section, lineage"):
        load_params(tmp_path / "params.yaml")
