"""train.devices > 1: `multitag stage train` relaunches itself through torch.distributed.run, one
process per device; on CPU the processes talk over gloo. Two processes here, with a time budget:
each process times its own steps, so the ranks must agree on rank 0's plan (or one waits forever
for the other's gradients)."""

import re

import torch
import yaml

from tests.conftest import BIN, ROOT, copy_data, run


def test_two_process_gloo_training_keeps_replicas_in_sync(data, tmp_path):
    ws = copy_data(data, tmp_path / "ws").root
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update(epochs=2, batch_size=8, device="cpu", devices=2, time_budget_s=8)
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    proc = run([str(BIN / "multitag"), "stage", "train"], ws, env={"OMP_NUM_THREADS": "1"})
    log = proc.stdout + proc.stderr
    shas = dict(re.findall(r"rank (\d)/2: final weights sha256 (\w+)", log))
    assert set(shas) == {"0", "1"}, log[-3000:]
    assert shas["0"] == shas["1"]  # DDP averaged the gradients: both replicas hold the same weights
    last = re.findall(r"epoch (\d+)/(\d+) ", log)[-1]
    assert last[0] == last[1] and (ws / "models" / "model.pt").exists()  # the planned epochs all ran
    model = torch.load(ws / "models" / "model.pt", weights_only=True)
    assert model["arch"] == "compact_cnn" and model["params"]["devices"] == 2
