"""The training recipe's parts against reference computations: losses, EMA, threshold targets,
augmentation presets, frozen backbone, test-time flip."""

import numpy as np
import pytest
import torch

from multitag.augment import augment, mixup
from multitag.config import AugmentParams, TrainParams, parse_params
from multitag.losses import AsymmetricLoss, FocalLoss, ModelEma, make_loss, pos_weight_for
from multitag.metrics import tune_thresholds
from multitag.models import build_model, predict_scores
from multitag.train import head_parameters, train
from tests.conftest import copy_data
from tests.test_train import _params


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


@pytest.fixture
def logits_targets():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, (16, 5))
    y = (rng.random((16, 5)) < 0.3).astype(np.float64)
    return z, y, torch.tensor(z), torch.tensor(y)


def test_bce_with_pos_weight_matches_the_formula(logits_targets):
    z, y, zt, yt = logits_targets
    w = pos_weight_for(yt).numpy()
    p = _sigmoid(z)
    ref = -(w * y * np.log(p) + (1 - y) * np.log(1 - p)).mean()
    loss = make_loss(TrainParams(loss="bce", pos_weight=True), yt)(zt, yt)
    assert loss.item() == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_focal_loss_matches_the_formula(logits_targets, gamma):
    z, y, zt, yt = logits_targets
    p = _sigmoid(z)
    p_t = np.where(y == 1, p, 1 - p)
    ref = (-(1 - p_t) ** gamma * np.log(p_t)).mean()
    assert FocalLoss(gamma)(zt, yt).item() == pytest.approx(ref, rel=1e-9)
    if gamma == 0:  # no focusing: plain BCE
        assert ref == pytest.approx(torch.nn.BCEWithLogitsLoss()(zt, yt).item(), rel=1e-9)


@pytest.mark.parametrize("gamma_pos,gamma_neg,clip", [(0.0, 4.0, 0.05), (1.0, 2.0, 0.0)])
def test_asymmetric_loss_matches_the_formula(logits_targets, gamma_pos, gamma_neg, clip):
    z, y, zt, yt = logits_targets
    p = _sigmoid(z)
    p_m = np.maximum(p - clip, 0)
    ref = -(y * (1 - p) ** gamma_pos * np.log(np.maximum(p, 1e-8))
            + (1 - y) * p_m ** gamma_neg * np.log(np.maximum(1 - p_m, 1e-8))).mean()
    loss = make_loss(TrainParams(loss="asl", asl_gamma_pos=gamma_pos, asl_gamma_neg=gamma_neg, asl_clip=clip), yt)
    assert isinstance(loss, AsymmetricLoss) and loss(zt, yt).item() == pytest.approx(ref, rel=1e-9)
    # a negative predicted below the clip costs nothing
    assert AsymmetricLoss(clip=0.05)(torch.tensor([[-4.0]]), torch.tensor([[0.0]])).item() == 0.0


def test_ema_follows_the_decay_formula_and_copies_integer_buffers():
    model = torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.BatchNorm1d(1))
    ema = ModelEma(model, decay=0.9)
    expected = model[0].weight.detach().clone()
    for n in range(1, 6):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        model[1].num_batches_tracked += 1
        ema.update(model)
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * model[0].weight.detach()
    assert torch.allclose(ema.state["0.weight"], expected, atol=1e-6)
    assert ema.state["1.num_batches_tracked"].item() == 5
    restored = ModelEma(model, 0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 5 and torch.equal(restored.state["0.weight"], ema.state["0.weight"])


def test_threshold_targets():
    y = np.array([[1], [1], [0], [1], [0], [0], [1], [0]])
    s = np.array([[0.9], [0.8], [0.7], [0.6], [0.5], [0.4], [0.3], [0.2]])
    # F1 is best at 0.3 (all four positives, 3 false: F1 8/11) vs 0.6 (3 of 4, 1 false: F1 0.75)
    assert tune_thresholds(y, s)[0] == pytest.approx(0.55)
    # recall >= 0.5: the cut at 0.8 already has it with precision 1
    assert tune_thresholds(y, s, metric="precision_at_recall", min_recall=0.5)[0] == pytest.approx(0.75)
    # recall 1 needs the cut at 0.3 (precision 4/7)
    assert tune_thresholds(y, s, metric="precision_at_recall", min_recall=1.0)[0] == pytest.approx(0.25)


def test_augment_presets_and_tensor_ops():
    a = AugmentParams(preset="photos", cutout=0.5)
    assert (a.hflip, a.crop_scale, a.color_jitter, a.cutout) == (True, [0.5, 1.0], 0.2, 0.5)
    assert AugmentParams(preset="none").random_resized_crop is False
    with pytest.raises(Exception, match="train.augment.preset"):
        parse_params({"train": {"augment": {"preset": "wild"}}})
    x = torch.rand(8, 3, 16, 16)
    g = torch.Generator().manual_seed(0)
    jittered = augment(x, AugmentParams(preset="none", color_jitter=0.4), g)
    assert jittered.shape == x.shape and 0 <= jittered.min() and jittered.max() <= 1 and not torch.equal(x, jittered)
    holed = augment(x, AugmentParams(preset="none", cutout=0.25), g)
    changed = (holed != x).any(dim=1)  # pixels set to grey, a 4x4 square per image
    assert ((holed == 0.5).all(dim=1) | ~changed).all()
    assert all(0 < c.sum() <= 16 for c in changed)


def test_rotation_turns_images_and_mixup_blends_targets():
    bar = torch.zeros(64, 1, 32, 32)
    bar[:, :, 4:28, 14:18] = 1  # a vertical bar: turned, it spans more columns
    turned = augment(bar, AugmentParams(preset="none", rotation=90), torch.Generator().manual_seed(0))
    cols = (turned[:, 0] > 0.5).any(dim=1).sum(dim=1)
    assert cols.min() <= 8 and cols.max() >= 20  # an angle near 0 keeps the bar narrow, one near +-90 lays it across
    assert torch.equal(augment(bar, AugmentParams(preset="none", rotation=0), torch.Generator()), bar)
    x, y = torch.rand(16, 3, 8, 8), torch.eye(16)
    torch.manual_seed(0)
    xm, ym = mixup(x, y, 0.4, torch.Generator().manual_seed(0))
    assert xm.shape == x.shape and torch.allclose(ym.sum(dim=1), torch.ones(16))  # weights of two images
    assert ((ym > 0).sum(dim=1) <= 2).all() and not torch.equal(ym, y)
    with pytest.raises(Exception, match="train.augment.rotation"):
        parse_params({"train": {"augment": {"rotation": 270}}})


def test_frozen_backbone_trains_only_the_head(data):
    torch.manual_seed(0)
    before = build_model("simple_cnn", 3, 16).state_dict()
    train(_params(epochs=1, freeze_epochs=1), data)
    after = torch.load(data.model, weights_only=True)["state_dict"]
    head = {k for k in after if k.startswith("backbone.classifier.") and k.rsplit(".", 1)[-1] in ("weight", "bias")
            and after[k].ndim <= 2 and after[k].shape[0] == 3}
    assert head and all(not torch.equal(before[k], after[k]) for k in head)
    frozen = [k for k in after if k not in head and after[k].dtype.is_floating_point and "running" not in k]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert [t.shape for t in head_parameters(build_model("resnet18", 3, 32))] == [(3, 512), (3,)]


def test_ema_training_records_both_and_resumes_exactly(data, tmp_path):
    p = _params(epochs=3, ema_decay=0.9, loss="asl")
    torch.set_num_threads(1)
    cut = copy_data(data, tmp_path / "cut")
    train(p, data)
    train(p, cut, stop_after_epochs=2)
    train(p, cut)
    history = data.train_history.read_text().splitlines()
    rows = [dict(zip(history[0].split(","), line.split(","))) for line in history[1:]]
    assert all(r["val_map_ema"] and r["kept"] in ("raw", "ema") for r in rows)
    assert all(float(r["val_map"]) == max(float(r["val_map_raw"]), float(r["val_map_ema"])) for r in rows)
    assert data.model.read_bytes() == cut.model.read_bytes()


def test_test_time_flip_averages_the_mirror():
    torch.manual_seed(0)
    model = build_model("simple_cnn", 2, 8).eval()
    x = torch.randint(0, 255, (4, 8, 8, 3), dtype=torch.uint8)
    plain = predict_scores(model, x, torch.device("cpu"))
    mirrored = predict_scores(model, x.flip(2), torch.device("cpu"))
    both = predict_scores(model, x, torch.device("cpu"), tta="hflip")
    assert np.allclose(both, (plain + mirrored) / 2, atol=1e-6)


def test_compiled_training_saves_a_plain_model(data):
    from multitag.models import load_model_file

    result = train(_params(epochs=1, compile=True), data)
    model, meta = load_model_file(data.model)  # no torch.compile prefixes in the keys
    assert result.epochs_run == 1 and meta["params"]["compile"] is True


def test_dataloader_workers_reading_the_shards_train_the_same_weights(data, tmp_path):
    torch.set_num_threads(1)
    workers = copy_data(data, tmp_path / "w2")
    train(_params(epochs=2), data)
    train(_params(epochs=2, workers=2), workers)
    a = torch.load(data.model, weights_only=True)["state_dict"]
    b = torch.load(workers.model, weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # same batches in the same order, only read differently


def test_shard_split_gathers_like_the_in_memory_split(data):
    from multitag.dataset import ShardSplit, load_split

    memory, y, _ = load_split(data, "train")
    shards, y2, _ = load_split(data, "train", in_memory=False)
    assert isinstance(shards, ShardSplit) and len(shards) == len(memory) and shards.shape == tuple(memory.shape)
    idx = torch.tensor([63, 0, 49, 50, 7])  # across the two shard files, out of order
    assert torch.equal(shards[idx], memory[idx]) and torch.equal(y, y2)
