"""How the stages after ingest scale with the number of labels: the same images at 10, 100 and 1,000
labels, each stage in a fresh process, its wall time and peak memory.

    .venv/bin/python bench/labels.py --images 2000 --labels 10,100,1000

The data are made straight into the prepared layout (uint8 shards + manifest: what ingest writes;
decoding does not depend on labels): 32 px images, labels with a long-tailed frequency (label k in
about 30% / (k+1)^0.7 of the images). Each workspace runs labels, train (compact_cnn, 2 epochs),
evaluate and register with params.yaml otherwise as shipped. Prints a table per label count, then
for each stage the ratio of its time and memory at the largest count to the smallest, against the
ratio of label counts (linear growth would match it; anything above is worse than linear).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["labels", "train", "evaluate", "register"]


def make_workspace(ws: Path, images: int, labels: int, seed: int = 0) -> None:
    from multitag.layout import Layout, split_for

    rng = np.random.default_rng(seed)
    layout = Layout(ws)
    layout.shards.mkdir(parents=True)
    freq = 0.3 / np.arange(1, labels + 1) ** 0.7
    y = rng.random((images, labels)) < freq
    x = rng.integers(0, 60, (images, 32, 32, 3), dtype=np.uint8)
    for j in range(min(labels, 64)):  # a learnable signal for the most frequent labels: a bright spot
        r, c = divmod(j, 8)
        x[y[:, j], r * 4:r * 4 + 4, c * 4:c * 4 + 4, j % 3] = 250
    digests = [hashlib.sha256(f"{seed}-{i}".encode()).hexdigest() for i in range(images)]
    np.save(layout.shard(0), x)
    pd.DataFrame({"id": [d[:16] for d in digests], "source": [f"{i}.png" for i in range(images)], "sha256": digests,
                  "split": [split_for(d, 0.15, 0.2) for d in digests],
                  "tags": [[f"label_{j:04d}" for j in np.flatnonzero(row)] for row in y],
                  "shard": 0, "offset": np.arange(images)}).to_parquet(layout.manifest)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update(epochs=2, patience=2)
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    (ws / "reports").mkdir()
    (ws / "reports/ingest.json").write_text(json.dumps({"data_version": "bench", "splits": {}}))
    (ws / "reports/ingest_issues.csv").write_text("record,image,reason\n")


def child(stage: str, ws: str) -> dict:
    import importlib
    import os

    from multitag.config import load_params
    from multitag.layout import STAGE_MODULES, Layout

    os.chdir(ws)
    params = load_params("params.yaml")
    start = time.perf_counter()
    importlib.import_module(STAGE_MODULES[stage]).run(params, Layout("."))
    return {"seconds": round(time.perf_counter() - start, 2),
            "peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--labels", default="10,100,1000")
    ap.add_argument("--plots", type=Path, help="copy each run's label_stats.png and pr_curves.png here")
    args = ap.parse_args()
    counts = [int(n) for n in args.labels.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            ws = Path(tmp) / f"ws{n}"
            make_workspace(ws, args.images, n)
            for stage in STAGES:
                out = subprocess.run([sys.executable, __file__, "--child", stage, str(ws)], capture_output=True, text=True)
                if out.returncode:
                    raise SystemExit(f"{stage} at {n} labels failed:\n{out.stderr[-3000:]}")
                rows.append({"labels": n, "stage": stage, **json.loads(out.stdout.splitlines()[-1])})
            if args.plots:
                args.plots.mkdir(parents=True, exist_ok=True)
                for name in ("label_stats", "pr_curves"):
                    shutil.copy(ws / f"reports/plots/{name}.png", args.plots / f"{name.replace('_', '-')}-{n}.png")
            print(f"  {n} labels done", flush=True)
    table = pd.DataFrame(rows)
    print(f"{args.images} images of 32 px, compact_cnn 2 epochs; each stage in a fresh process (its peak includes "
          "the Python + torch baseline, about 350 MiB)")
    print(table.pivot(index="stage", columns="labels", values=["seconds", "peak_mib"]).loc[STAGES].to_string())
    lo, hi = counts[0], counts[-1]
    for stage in STAGES:
        a = table[(table.stage == stage) & (table.labels == lo)].iloc[0]
        b = table[(table.stage == stage) & (table.labels == hi)].iloc[0]
        print(f"ratio {stage}: time x{b.seconds / a.seconds:.2f}, peak memory x{b.peak_mib / a.peak_mib:.2f} "
              f"for x{hi / lo:.0f} labels")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3])))
    else:
        main()
