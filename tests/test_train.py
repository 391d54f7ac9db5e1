import json

import pytest
import torch

from multitag.augment import augment
from multitag.config import AugmentParams, TrainParams
from multitag.losses import pos_weight_for
from multitag.models import build_model, load_model_file, save_model_file
from multitag.train import train
from tests.conftest import copy_data


def _params(**kw):
    return TrainParams(**{"model": "simple_cnn", "epochs": 4, "batch_size": 16, "lr": 0.003, "patience": 10,
                          "device": "cpu", **kw})


def test_training_learns_and_writes_a_self_describing_model(data):
    result = train(_params(), data)
    assert result.epochs_run == 4 and result.best_val_map > 0.8
    model, meta = load_model_file(data.model)
    assert meta["labels"] == ["a", "b", "c"] and meta["image_size"] == 16 and meta["arch"] == "simple_cnn"
    assert meta["params"]["epochs"] == 4 and meta["tta"] == "none"
    history = data.train_history.read_text().splitlines()
    assert history[0] == "epoch,train_loss,val_map,val_map_raw,val_map_ema,kept,lr" and len(history) == 5
    timing = json.loads((data.run_log / "train.json").read_text())
    assert timing["device"] == "cpu" and len(timing["epoch_seconds"]) == 4 and timing["resumed_from_epoch"] == 0


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(data, tmp_path):
    p = _params(model="compact_cnn", epochs=3, batch_size=16)  # it has dropout: the global RNG must resume too
    torch.set_num_threads(1)  # bitwise-repeatable CPU kernels
    train(p, data)
    cut_ws = copy_data(data, tmp_path / "cut")
    cut = train(p, cut_ws, stop_after_epochs=1)
    assert cut.epochs_run == 1 and cut_ws.checkpoint.exists()
    resumed = train(p, cut_ws)
    assert resumed.epochs_run == 3
    assert json.loads((cut_ws.run_log / "train.json").read_text())["resumed_from_epoch"] == 1
    assert data.model.read_bytes() == cut_ws.model.read_bytes()  # best weights and metadata, byte for byte
    last, last_cut = (torch.load(w.checkpoint, weights_only=True)["model"] for w in (data, cut_ws))
    assert last.keys() == last_cut.keys() and all(torch.equal(last[k], last_cut[k]) for k in last)


def test_checkpoint_of_other_params_is_not_resumed(data):
    train(_params(), data, stop_after_epochs=1)
    train(_params(lr=0.001), data)
    assert json.loads((data.run_log / "train.json").read_text())["resumed_from_epoch"] == 0


def test_pretrained_weights_load_from_a_local_file(tmp_path):
    source = build_model("resnet18", 5, 32)
    torch.save(source.backbone.state_dict(), tmp_path / "weights.pth")
    model = build_model("resnet18", 3, 32, pretrained=str(tmp_path / "weights.pth"))
    assert torch.equal(model.backbone.conv1.weight, source.backbone.conv1.weight)
    assert model.backbone.fc.out_features == 3  # head replaced for the label count
    with pytest.raises(FileNotFoundError, match="weights file not found: .*nope.pth"):
        build_model("resnet18", 3, 32, pretrained=str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="unknown model 'resnet19'"):
        build_model("resnet19", 3, 32)


def test_augment_keeps_shape_and_identity_when_off():
    x = torch.rand(4, 3, 16, 16)
    g = torch.Generator().manual_seed(0)
    assert augment(x, AugmentParams(preset="none"), g) is x
    y = augment(x, AugmentParams(hflip=True), g)
    assert y.shape == x.shape and not torch.equal(x, y)


def test_pos_weight_counts_negatives_per_positive():
    y = torch.tensor([[1, 0], [0, 0], [0, 0], [1, 0]], dtype=torch.float32)
    assert torch.equal(pos_weight_for(y), torch.tensor([1.0, 4.0]))  # 2 neg/2 pos; no positives: capped count


def test_model_file_round_trip(tmp_path):
    m = build_model("simple_cnn", 2, 8)
    save_model_file(tmp_path / "m.pt", arch="simple_cnn", labels=["x", "y"], image_size=8, state_dict=m.state_dict())
    loaded, meta = load_model_file(tmp_path / "m.pt")
    x = torch.rand(1, 3, 8, 8)
    assert torch.allclose(loaded(x), m.eval()(x))


def test_torchvision_weights_by_name_from_the_hub_cache_offline(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")  # no network: a download fails at once
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cache = tmp_path / "torch-home/hub/checkpoints" / weights.url.rsplit("/", 1)[1]
    with pytest.raises(FileNotFoundError, match=f"not in the torch hub cache \\({cache}\\).*copy the file"):
        build_model("resnet18", 3, 32, pretrained="ResNet18_Weights.IMAGENET1K_V1")
    cache.parent.mkdir(parents=True, exist_ok=True)
    source = torchvision.models.resnet18()
    torch.save(source.state_dict(), cache)  # what torchvision would have downloaded there
    model = build_model("resnet18", 3, 32, pretrained="ResNet18_Weights.IMAGENET1K_V1")
    assert torch.equal(model.backbone.conv1.weight, source.conv1.weight) and model.backbone.fc.out_features == 3
    mean = weights.transforms().mean
    assert torch.allclose(model.mean.flatten(), torch.tensor(mean))  # the weights' own normalisation
    with pytest.raises(ValueError, match="are not weights of train.model resnet50"):
        build_model("resnet50", 3, 32, pretrained="ResNet18_Weights.IMAGENET1K_V1")


def test_a_time_budget_plans_the_epochs_and_anneals_the_schedule(data):
    result = train(_params(epochs=1, time_budget_s=6), data)
    assert result.planned_epochs > 1 and result.epochs_run == result.planned_epochs  # epochs from the budget
    assert result.seconds <= 6 * 1.5 and result.planned_seconds <= 6
    history = data.train_history.read_text().splitlines()
    last_lr = float(history[-1].split(",")[-1])
    assert last_lr < 0.003 * 0.01  # the one-cycle schedule ran to its end
    assert json.loads(data.train_summary.read_text())["time_budget_s"] == 6


def test_the_budget_is_fitted_again_from_a_measured_epoch_and_the_schedule_follows(data):
    from multitag.train import TrainState, build, load_data, replan, steps_per_epoch

    p = _params(epochs=10, time_budget_s=100)
    d = load_data(p, data)
    steps = steps_per_epoch(p, len(d.x_train))

    def after_two_epochs(planned: int):
        run = build(p, d, build_model("simple_cnn", 3, 16), torch.device("cpu"), epochs=planned)
        for _ in range(2 * steps):
            run.optimizer.step()
            run.scheduler.step()
        return run

    run, state = after_two_epochs(10), TrainState(epochs=10, planned_seconds=95.0, epoch=2)
    replan(run, state, p, len(d.x_train), left=40, epoch_seconds=10)  # 10 s an epoch, not 9.5: 3 more fit in 40 s
    assert state.epochs == 5 and state.planned_seconds == 60 + 3 * 10
    # the rebuilt schedule stands where a 5-epoch schedule stands after two epochs, and anneals at its end
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(after_two_epochs(5).optimizer.param_groups[0]["lr"])
    for _ in range(3 * steps - 1):
        run.optimizer.step()
        run.scheduler.step()
    assert run.optimizer.param_groups[0]["lr"] < p.lr * 0.01
    state = TrainState(epochs=10, epoch=2)
    replan(after_two_epochs(10), state, p, len(d.x_train), left=1, epoch_seconds=10)
    assert state.epochs == 3  # out of time: still one epoch more, in which the schedule anneals


def test_the_mldecoder_head_trains_saves_and_loads(data):
    model = build_model("compact_cnn", 250, 16, head="mldecoder")
    out = model(torch.rand(2, 3, 16, 16))
    assert out.shape == (2, 250) and model.backbone.decoder.queries.shape[0] == 100  # 100 groups for 250 labels
    result = train(_params(model="compact_cnn", head="mldecoder", epochs=2), data)
    loaded, meta = load_model_file(data.model)
    assert meta["head"] == "mldecoder" and result.epochs_run == 2
    x = torch.rand(3, 3, 16, 16)
    assert loaded(x).shape == (3, 3)
    with pytest.raises(ValueError, match="mldecoder needs a backbone with spatial features"):
        build_model("simple_cnn", 3, 16, head="mldecoder")
