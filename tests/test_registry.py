import json
import multiprocessing as mp

import pytest

from multitag.config import parse_params
from multitag.registry import CHAMPION, Comparison, Registry
from multitag.errors import NotFound
from multitag.storage import open_store


def _model_file(path, seed: int):
    import torch  # here, not at the top: the registering processes of the concurrency test import this
                  # module, and they need no torch (5 s a process on 2 cores)

    from multitag.models import build_model, save_model_file

    torch.manual_seed(seed)
    m = build_model("simple_cnn", 3, 8)
    save_model_file(path, arch="simple_cnn", labels=["a", "b", "c"], image_size=8, state_dict=m.state_dict())
    return path


def _card(test_map: float, test_set: str = "T1") -> dict:
    return {"labels": ["a", "b", "c"], "thresholds": [0.5, 0.5, 0.5], "test_set": test_set,
            "metrics": {"test": {"map": test_map, "images": 10}, "val": {"images": 5}},
            "params": parse_params({"train": {"model": "simple_cnn"}}).dump(), "git": {"commit": None, "dirty": None}}


@pytest.fixture
def registry(store_uri):
    return Registry(open_store(store_uri), "m")


def test_versions_champion_rule_and_idempotence(registry, tmp_path):
    r1 = registry.register({"model.pt": _model_file(tmp_path / "1.pt", 1)}, _card(0.80))
    assert (r1.version, r1.created, r1.champion) == (1, True, True)

    r2 = registry.register({"model.pt": _model_file(tmp_path / "2.pt", 2)}, _card(0.79))
    assert (r2.version, r2.champion, r2.previous_champion) == (2, False, 1)

    r3 = registry.register({"model.pt": _model_file(tmp_path / "3.pt", 3)}, _card(0.85), min_improvement=0.1)
    assert (r3.version, r3.champion) == (3, False)  # better, but not by min_improvement

    r4 = registry.register({"model.pt": _model_file(tmp_path / "4.pt", 4)}, _card(0.86), min_improvement=0.05)
    assert (r4.version, r4.champion, r4.previous_champion) == (4, True, 1)
    assert registry.resolve(CHAMPION) == 4

    again = registry.register({"model.pt": _model_file(tmp_path / "4b.pt", 4)}, _card(0.86))
    assert (again.version, again.created, again.champion) == (4, False, True)  # same weights: no new version
    assert [v["version"] for v in registry.versions()] == [1, 2, 3, 4]

    card = registry.card(4)
    assert card["metrics"]["test"]["map"] == 0.86 and card["weights_sha256"] and card["files"]["model.pt"]
    version, _ = registry.download_model("champion", tmp_path / "dl.pt")
    assert version == 4
    assert registry.store.exists("registry/m/versions/000004/MODEL_CARD.md")


def test_champion_compared_by_the_given_comparison_and_never_across_unlike_models(registry, tmp_path):
    registry.register({"model.pt": _model_file(tmp_path / "1.pt", 1)}, _card(0.95, "T1"))
    r = registry.register({"model.pt": _model_file(tmp_path / "2.pt", 2)}, _card(0.99, "T2"))
    assert not r.champion and "test set differs from champion v1's" in r.reason  # no comparison given: no promotion
    other = {**_card(0.99), "labels": ["x"]}
    r = registry.register({"model.pt": _model_file(tmp_path / "3.pt", 3)}, other)
    assert not r.champion and "label vocabulary differs" in r.reason
    seen = []

    def rescored(card, champion):
        seen.append(champion["version"])
        return Comparison(champion["version"], True, card["metrics"]["test"]["map"], 0.70, ", champion re-scored")
    r = registry.register({"model.pt": _model_file(tmp_path / "4.pt", 4)}, _card(0.80, "T2"), compare=rescored)
    assert seen == [1] and r.champion and "re-scored" in r.reason and (r.champion_map, r.compared_map) == (0.7, 0.8)
    assert registry.card(4)["comparison"]["champion_map"] == 0.7  # the card says how it was compared
    nan = registry.register({"model.pt": _model_file(tmp_path / "5.pt", 5)}, _card(float("nan")))
    assert not nan.champion and "never promoted" in nan.reason


def test_incomplete_version_is_invisible(registry, tmp_path):
    registry.register({"model.pt": _model_file(tmp_path / "1.pt", 1)}, _card(0.8))
    # a registration that died after claiming and uploading, before its version record
    registry.store.put_bytes("registry/m/versions/000002.claim", b"", if_none_match=True)
    registry.store.put_file("registry/m/versions/000002/model.pt", _model_file(tmp_path / "2.pt", 2))
    assert [v["version"] for v in registry.versions()] == [1]
    with pytest.raises(NotFound):
        registry.resolve(2)
    r = registry.register({"model.pt": _model_file(tmp_path / "3.pt", 3)}, _card(0.9))
    assert r.version == 3  # the dead claim's number is never reused


def _register_one(args):
    uri, i, model_path = args
    reg = Registry(open_store(uri), "m")
    return reg.register({"model.pt": model_path}, _card(0.5 + i / 100)).version


def test_concurrent_registrations_get_distinct_versions(store_uri, tmp_path):
    models = [_model_file(tmp_path / f"{i}.pt", 100 + i) for i in range(8)]
    with mp.get_context("spawn").Pool(8) as pool:
        versions = pool.map(_register_one, [(store_uri, i, m) for i, m in enumerate(models)])
    assert sorted(versions) == list(range(1, 9))
    reg = Registry(open_store(store_uri), "m")
    assert len(reg.versions()) == 8
    champion = json.loads(reg.store.get_bytes("registry/m/aliases/champion.json")[0])
    best = max(reg.versions(), key=lambda v: v["test_map"])
    assert champion["version"] == best["version"]  # every CAS loser re-decided against the winner
    for v in reg.versions():  # every version complete: its files match the card's checksums
        reg.download_model(v["version"], tmp_path / f"check{v['version']}.pt")


def test_promote_and_rollback_record_reasons(registry, tmp_path):
    for i, m in enumerate([0.7, 0.8, 0.9]):
        registry.register({"model.pt": _model_file(tmp_path / f"{i}.pt", i)}, _card(m))
    assert registry.resolve(CHAMPION) == 3
    rec = registry.promote(1, reason="v3 misbehaves on night photos")
    assert rec["version"] == 1 and "night photos" in rec["reason"] and rec["lineage"] == [1, 2, 3, 1]
    rec = registry.rollback(reason="night issue fixed")
    assert rec["version"] == 3 and "rolled back from v1" in rec["reason"]
    assert registry.rollback()["version"] == 2
    assert registry.rollback()["version"] == 1
    with pytest.raises(NotFound, match="no earlier champion"):
        registry.rollback()
    with pytest.raises(NotFound):
        registry.promote(9, reason="typo")
