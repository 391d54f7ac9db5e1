"""Peak memory of reading a large annotations CSV: multitag's chunked reader against reading the
whole file at once (what ingest did before: the text, then a DataFrame of it, then the records).

    .venv/bin/python bench/annotations.py --rows 1000000

Writes a Kaggle-Planet-like tags CSV (an image column, ~15 labels per row from a 300-label
vocabulary: about 200 MB for 1M rows), then reads it in two fresh processes, each doing the whole
annotation phase of ingest (records, tag checks) and reporting its peak resident memory
(ru_maxrss). Prints a table and the ratio last.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_csv(path: Path, rows: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    vocabulary = np.array([f"label_{i:03d}_{w}" for i, w in enumerate(rng.choice(
        ["agriculture", "cloudy", "primary", "water", "habitation", "road", "cultivation"], 300))])
    with path.open("w") as f:
        f.write("image_name,tags\n")
        for start in range(0, rows, 100_000):
            n = min(100_000, rows - start)
            counts = rng.integers(10, 21, n)
            picks = rng.integers(0, len(vocabulary), (n, 20))
            f.writelines(f"train_{start + i:07d},{' '.join(vocabulary[picks[i, :counts[i]]])}\n" for i in range(n))


def read(mode: str, path: str) -> dict:
    """Runs in a fresh process: the annotation phase of ingest, by ``mode``."""
    from multitag.config import IngestParams
    from multitag.errors import RecordError
    from multitag.formats import check_tags, read_records, read_tags_csv

    p = IngestParams(annotations=path, images="", max_rejected_fraction=1.0)
    start = time.perf_counter()
    if mode == "whole":  # the file at once: its text, a DataFrame of it, then the records
        import pandas as pd
        text = Path(path).read_text(encoding="utf-8-sig")
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, skipinitialspace=True)
        fmt, records = "tags_csv", read_tags_csv(Path(path), p, df)
    else:
        fmt, records = read_records(p)
    tags = 0
    for r in records:
        try:
            tags += len(check_tags(r, fmt, p))
        except RecordError:
            pass
    return {"records": len(records), "tags": tags, "seconds": round(time.perf_counter() - start, 1),
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "annotations.csv"
        write_csv(path, args.rows)
        size = path.stat().st_size / 2**20
        print(f"annotations: {args.rows} rows, {size:.0f} MiB; 2 CPU threads")
        results = {}
        for mode in ("whole", "multitag"):
            out = subprocess.run([sys.executable, __file__, "--child", mode, str(path)], capture_output=True, text=True,
                                 check=True).stdout
            results[mode] = json.loads(out.splitlines()[-1])
        print(f"{'reader':<28}{'records':>10}{'peak MiB':>10}{'seconds':>9}")
        for mode, label in (("whole", "whole file (before)"), ("multitag", "multitag (chunked)")):
            r = results[mode]
            print(f"{label:<28}{r['records']:>10}{r['peak_mib']:>10.0f}{r['seconds']:>9.1f}")
        assert results["whole"]["tags"] == results["multitag"]["tags"]  # the same records either way
        print(f"ratio: peak memory multitag / whole file = {results['multitag']['peak_mib'] / results['whole']['peak_mib']:.2f}"
              f" ({results['multitag']['peak_mib']:.0f} MiB for {args.rows} rows)")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(read(sys.argv[2], sys.argv[3])))
    else:
        main()
