"""What a cluster does to a run, measured with the engines' real processes on loopback (the same
helpers as tests/test_scale.py):

    .venv/bin/python bench/faults.py --worker-wait 30

1. A `dask scheduler` whose only `dask worker` is killed before an ingest: seconds until the run
   ends, against compute.worker_wait_s (Dask alone would wait forever).
2. Two `multitag stage train` launches as two nodes with the default model (compact_cnn, BatchNorm)
   on CPU/gloo: the final weights' sha256 on each rank, and which node wrote the model.
3. The same run interrupted (SIGINT to both stages once the first checkpoint is in the shared
   store, `.multitag` then deleted on both) and started again: its final weights against (2)'s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from multitag.config import ComputeParams, IngestParams  # noqa: E402
from multitag.errors import ComputeError  # noqa: E402
from multitag.ingest import ingest  # noqa: E402
from multitag.layout import Layout  # noqa: E402
from tests.conftest import free_port, stop_process_group, tiny_data  # noqa: E402
from tests.test_scale import _final_weights, _nodes, _photos, _start_nodes, start_dask  # noqa: E402


def no_workers(tmp: Path, wait_s: float) -> None:
    address, scheduler, [worker] = start_dask(tmp / "dask", workers=1)
    _photos(tmp / "photos", n=40)
    p = IngestParams(annotations=str(tmp / "photos/labels.csv"), images=str(tmp / "photos/images"), image_size=16)
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    start = time.time()
    try:
        ingest(p, Layout(tmp / "ws"), compute=ComputeParams(dask=address, worker_wait_s=wait_s))
        print("no workers: the ingest finished?")
    except ComputeError as err:
        took = time.time() - start
        print(f"no workers: the run ended after {took:.1f} s with compute.worker_wait_s {wait_s:g} "
              f"(x{took / wait_s:.2f}): {err}")
    finally:
        stop_process_group(scheduler)


def two_nodes(tmp: Path) -> None:
    data = tiny_data(tmp / "data")
    start = time.time()
    whole = _nodes(data, tmp / "whole", tmp / "store-whole", free_port())
    sha = _final_weights(_start_nodes(whole))
    print(f"two nodes, compact_cnn, 4 epochs: both ranks end with sha256 {sha} ({time.time() - start:.0f} s); "
          f"model written on node {[ws.model.exists() for ws in whole].index(True)} (MULTITAG_NODE_RANK=0, "
          "started second)")
    cut = _nodes(data, tmp / "cut", tmp / "store-cut", free_port())
    procs = _start_nodes(cut)
    while not any((tmp / "store-cut/checkpoints").glob("*.pt")):
        time.sleep(0.2)
    for proc in procs:
        proc.send_signal(signal.SIGINT)
    codes = [proc.wait(60) for proc in procs]
    for ws in cut:
        shutil.rmtree(ws.root / ".multitag", ignore_errors=True)
    resumed = _final_weights(_start_nodes(cut))
    epoch = (cut[1].run_log / "train.json").read_text().split('"resumed_from_epoch": ')[1].split(",")[0]
    print(f"interrupted (exit {codes}) and resumed from epoch {epoch} on two nodes: sha256 {resumed}; "
          f"equal to the uninterrupted run: {resumed == sha}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker-wait", type=float, default=30)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        no_workers(Path(tmp) / "a", args.worker_wait)
        two_nodes(Path(tmp) / "b")


if __name__ == "__main__":
    main()
