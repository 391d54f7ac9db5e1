"""Ingest and batch prediction on this machine's process pool against Dask clusters, side by side.

    .venv/bin/python bench/scale.py --images 10000 --size 256

The same folder of JPEG photos (``--size`` px, made once) is ingested at 64 px and then predicted by
a compact_cnn model, with compute.dask null (a local process pool / one process), local:1 and
local:2 (a Dask LocalCluster of 1 and 2 worker processes, started and stopped around each run, so
their start-up is counted). The outputs are checked equal. Then the same on a tiny input (32
images): what a cluster costs when there is nothing to spread. Prints seconds and images/s, the
ratios against the local run last.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from multitag.config import ComputeParams, IngestParams
from multitag.ingest import ingest
from multitag.layout import Layout
from multitag.models import build_model, save_model_file
from multitag.predict import predict_folder
from multitag.storage import LocalStore

ENGINES = {"local pool": None, "dask local:1": "local:1", "dask local:2": "local:2"}


def photos(folder: Path, n: int, size: int) -> Path:
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        low = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((size, size * 3 // 4), Image.BICUBIC)
        img.save(folder / "images" / f"{i:05d}.jpg", quality=88)
        rows.append((f"{i:05d}.jpg", " ".join(sorted(rng.choice(list("abcd"), rng.integers(0, 3), replace=False)))))
    pd.DataFrame(rows, columns=["image_name", "tags"]).to_csv(folder / "labels.csv", index=False)
    return folder


def run_all(folder: Path, tmp: Path, tag: str) -> dict:
    p = IngestParams(annotations=str(folder / "labels.csv"), images=str(folder / "images"), image_size=64,
                     max_rejected_fraction=0.0)
    model = tmp / "m.pt"
    if not model.exists():
        save_model_file(model, arch="compact_cnn", labels=list("abcd"), image_size=64,
                        state_dict=build_model("compact_cnn", 4, 64).state_dict())
    out = {}
    for name, dask in ENGINES.items():
        compute = ComputeParams(dask=dask)
        ws = Layout(tmp / f"{tag}-{name.replace(' ', '-').replace(':', '')}")
        start = time.perf_counter()
        ingest(p, ws, cache=False, compute=compute)
        ingest_s = time.perf_counter() - start
        start = time.perf_counter()
        predict_folder(folder / "images", str(model), LocalStore(tmp / "store"), "m", ws.root / "pred.parquet",
                       compute=compute)
        predict_s = time.perf_counter() - start
        out[name] = {"ingest_s": ingest_s, "predict_s": predict_s, "manifest": ws.manifest.read_bytes(),
                     "pred": pd.read_parquet(ws.root / "pred.parquet")}
    first = next(iter(out.values()))
    for name, r in out.items():  # the same outputs from every engine
        assert r["manifest"] == first["manifest"], name
        assert np.abs(r["pred"]["p_a"].to_numpy() - first["pred"]["p_a"].to_numpy()).max() < 1e-5, name
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        big = run_all(photos(tmp / "big", args.images, args.size), tmp, "big")
        tiny = run_all(photos(tmp / "tiny", 32, args.size), tmp, "tiny")
    print(f"{args.images} JPEG photos {args.size}x{args.size * 3 // 4} -> 64 px; predict with compact_cnn; "
          "2 CPU cores; cluster start-up included")
    print(f"{'engine':<16}{'ingest s':>10}{'img/s':>8}{'predict s':>11}{'img/s':>8}{'tiny ingest s':>15}{'tiny predict s':>16}")
    for name in ENGINES:
        b, t = big[name], tiny[name]
        print(f"{name:<16}{b['ingest_s']:>10.1f}{args.images / b['ingest_s']:>8.0f}{b['predict_s']:>11.1f}"
              f"{args.images / b['predict_s']:>8.0f}{t['ingest_s']:>15.2f}{t['predict_s']:>16.2f}")
    base = big["local pool"]
    for name in list(ENGINES)[1:]:
        print(f"ratio {name} / local pool: ingest time x{big[name]['ingest_s'] / base['ingest_s']:.2f}, "
              f"predict time x{big[name]['predict_s'] / base['predict_s']:.2f}; tiny input: ingest "
              f"+{tiny[name]['ingest_s'] - tiny['local pool']['ingest_s']:.1f} s, predict "
              f"+{tiny[name]['predict_s'] - tiny['local pool']['predict_s']:.1f} s")


if __name__ == "__main__":
    main()
