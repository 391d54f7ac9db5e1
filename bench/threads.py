"""CPU training when two processes share the cores: libgomp's default busy-wait against a shorter one.

    .venv/bin/python bench/threads.py [--images 1024] [--epochs 2] [--image-size 32] [--repeats 3]

torch's CPU kernels run on OpenMP (libgomp) threads, one per core. At the end of each parallel
region a thread that has nothing to do spins, by default for 300,000 turns, before it sleeps: on an
idle machine that saves a wake-up, but when another process's threads want the same cores, the
spinning takes the cores from them. libgomp drops to 100 turns by itself only when one process asks
for more threads than there are cores; it cannot see the other process. The setting compared
(--spin, 1,000 by default) is the one the test suite runs under (tests/conftest.py), whose workers
share the cores; multitag leaves libgomp's default alone (a lone training is the common case).

Each row trains params.yaml's model with multitag's training loop (augmentation, loss, optimizer,
schedule; train_one_epoch) on random uint8 images, in fresh processes (libgomp reads the setting when
torch loads): one process alone, and two at once (two runs side by side, a prediction beside a
run, the test suite's workers; Dask's local workers and torchrun's processes on one node are given
one thread each, which does not spin), under libgomp's default and under --spin. The rows take
turns, --repeats times. Prints images/s per process and the CPU seconds per 1,000 images, then the
ratios: --spin / libgomp's default, alone and two at once.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBGOMP_DEFAULT = "300000"  # libgomp's spin count when neither variable is set (its documentation)


def child(images: int, epochs: int, size: int) -> None:
    """Train for ``epochs`` on ``images`` random images; print images/s and CPU seconds as JSON."""
    import torch

    from multitag.config import load_params
    from multitag.losses import make_loss
    from multitag.models import build_model
    from multitag.train import Run, TrainData, make_optimizer, make_scheduler, train_one_epoch

    p = load_params(ROOT / "params.yaml").train.model_copy(update={"device": "cpu"})
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (images, size, size, 3), dtype=torch.uint8, generator=gen)
    y = (torch.rand(images, 10, generator=gen) < 0.2).float()
    torch.manual_seed(0)
    model = build_model(p.model, y.shape[1], size)
    opt = make_optimizer(model, p)
    steps = images // p.batch_size
    run = Run(model, model, opt, make_scheduler(opt, p, steps * (epochs + 1)), make_loss(p, y), torch.device("cpu"), gen)
    data = TrainData(x, y, x[:0], y[:0], [], size)
    train_one_epoch(run, data, p, 0)  # warm-up: first-call costs
    cpu0, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for epoch in range(1, epochs + 1):
        train_one_epoch(run, data, p, epoch)
    seconds, cpu1 = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    print(json.dumps({"images": steps * p.batch_size * epochs, "seconds": seconds, "cpu": cpu,
                      "threads": torch.get_num_threads()}))


def row(spin: str, processes: int, args) -> list[dict]:
    """``processes`` children started together with GOMP_SPINCOUNT=``spin``; their reports."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["GOMP_SPINCOUNT"] = spin
    cmd = [sys.executable, __file__, "--child", "--images", str(args.images), "--epochs", str(args.epochs),
           "--image-size", str(args.image_size)]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    out = [proc.communicate()[0] for proc in procs]
    if any(proc.returncode for proc in procs):
        raise SystemExit(f"a training process failed: {[proc.returncode for proc in procs]}")
    return [json.loads(o.strip().splitlines()[-1]) for o in out]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--spin", default="1000", help="the spin count to compare with libgomp's default")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.images, args.epochs, args.image_size)
    rows = {(spin, n): [] for n in (1, 2) for spin in (LIBGOMP_DEFAULT, args.spin)}
    for _ in range(args.repeats):  # the rows take turns: a slower stretch of the machine hits all of them
        for spin, n in rows:
            rows[spin, n] += row(spin, n, args)
    rate = {key: sum(r["images"] for r in rs) / sum(r["seconds"] for r in rs) for key, rs in rows.items()}
    cpu = {key: 1000 * sum(r["cpu"] for r in rs) / sum(r["images"] for r in rs) for key, rs in rows.items()}
    first = next(iter(rows.values()))[0]
    print(f"params.yaml's model, {args.images} random images at {args.image_size} px, {args.epochs} epochs per "
          f"process, {first['threads']} threads each, {args.repeats} repeats; {os.cpu_count()} CPUs")
    print(f"{'row':<58}{'images/s per process':>22}{'CPU s per 1,000 images':>24}")
    for (spin, n) in rows:
        name = f"{'alone' if n == 1 else 'two at once'}, GOMP_SPINCOUNT={spin}"
        name += " (libgomp's default)" if spin == LIBGOMP_DEFAULT else ""
        print(f"{name:<58}{rate[spin, n]:>22.0f}{cpu[spin, n]:>24.2f}")
    ratio = {n: rate[args.spin, n] / rate[LIBGOMP_DEFAULT, n] for n in (1, 2)}
    print(f"ratio images/s, GOMP_SPINCOUNT={args.spin} / libgomp's default: alone {ratio[1]:.2f}, "
          f"two at once {ratio[2]:.2f}")


if __name__ == "__main__":
    main()
