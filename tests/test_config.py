import pytest
import yaml

from multitag.config import ConfigError, load_params, parse_params
from tests.conftest import ROOT


def test_repo_params_load():
    p = load_params(ROOT / "params.yaml")
    assert p.ingest.delimiter == " "
    assert p.train.augment.hflip is False and p.train.augment.vflip is False  # digits must not be mirrored


def test_params_yaml_is_the_documented_copy_of_the_defaults():
    demo, defaults = load_params(ROOT / "params.yaml"), parse_params({})
    # the differences, marked SAMPLE DATA there: the digits demo turns off the default's mirror, in
    # training and in the presets tune tries
    assert (demo.train.augment.preset, defaults.train.augment.preset) == ("digits", "light")
    assert (demo.tune.augment, defaults.tune.augment) == (["digits", "none"], ["none", "light", "photos", "strong"])
    assert demo == defaults.model_copy(update={"train": defaults.train.model_copy(update={"augment": demo.train.augment}),
                                               "tune": defaults.tune.model_copy(update={"augment": demo.tune.augment})})
    written = defaults.dump()
    del written["lineage"]
    written["train"]["augment"] = {"preset": "digits"}  # a preset stands for its keys
    written["tune"]["augment"] = ["digits", "none"]
    assert yaml.safe_load((ROOT / "params.yaml").read_text()) == written  # every key written out, none extra


@pytest.mark.parametrize("raw, key", [
    ({"train": {"lrr": 0.1}}, "train.lrr"),
    ({"trian": {}}, "trian"),
    ({"train": {"augment": {"hflipp": True}}}, "train.augment.hflipp"),
])
def test_unknown_key_is_named(raw, key):
    with pytest.raises(ConfigError, match=rf"{key}: unknown key"):
        parse_params(raw)


def test_wrong_type_and_choice_are_named():
    with pytest.raises(ConfigError, match=r"train.epochs"):
        parse_params({"train": {"epochs": "many"}})
    with pytest.raises(ConfigError, match=r"train.schedule.*'onecycle' or 'cosine'"):
        parse_params({"train": {"schedule": "step"}})


def test_split_fractions_must_leave_training_data():
    with pytest.raises(ConfigError, match="val_fraction \\+ test_fraction"):
        parse_params({"ingest": {"val_fraction": 0.5, "test_fraction": 0.5}})


def test_the_store_recorded_in_the_lineage_overrides_store_uri():
    assert parse_params({"store": {"uri": "store"}}, lineage={"store": "/tmp/elsewhere"}).store.uri == "/tmp/elsewhere"
    with pytest.raises(ConfigError, match="lineage: unknown key"):
        parse_params({"lineage": {}})


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "params.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
