"""What Prefect and DVC add: the same tiny pipeline run three ways, side by side.

    .venv/bin/python bench/overhead.py [--images 48] [--epochs 1] [--repeats 3] [--before GIT_REF]

(1) direct: one Python process calling the stage functions (sample, ingest, labels, train,
    evaluate, register) one after another, as a hand-written script would;
(2) `dvc repro`: the same stages from dvc.yaml, each in its own `multitag stage` process, with
    DVC hashing inputs and outputs and writing dvc.lock;
(3) `multitag run`: the Prefect flow (temporary local API server, one task per stage, each running
    its stage through DVC, artifacts), i.e. (2) plus Prefect; its Prefect home is new, so the
    temporary server first creates its database, as on a user's first run;
(4) `multitag run` once more in the same workspace, nothing changed: every stage skipped by DVC, the
    cost of orchestration alone on a Prefect home that exists;
(5) `multitag run` in another new workspace on that Prefect home: (3) as on any run but a machine's
    first, whose database exists;
with --before REF, (3), (4) and (5) once more with the code of git commit REF (a worktree put first on
PYTHONPATH, its own dvc.yaml and Prefect home), in the same run.

Each way runs in its own fresh git + DVC workspace with the same params (params.yaml shrunk to
--images images and --epochs epochs). Each way runs --repeats times, the ways taking turns; prints
the median wall seconds of each, then what DVC and Prefect add.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1",
       "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING",
       "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}  # as the Makefile: code before --before REF lacks it


def direct(workspace: Path) -> None:
    """The stage functions called in this process, in the workspace."""
    import importlib

    from multitag.config import load_params
    from multitag.layout import PIPELINE, STAGE_MODULES, Layout

    os.chdir(workspace)
    p = load_params("params.yaml")
    for stage in PIPELINE:
        importlib.import_module(STAGE_MODULES[stage]).run(p, Layout("."))


def workspace(base: Path, name: str, params: dict, code: Path = ROOT) -> Path:
    ws = base / name
    ws.mkdir()
    for name in ("dvc.yaml", "lineage.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(code / name, ws)
    shutil.copytree(code / "multitag", ws / "multitag", ignore=shutil.ignore_patterns("__pycache__"))
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"],
                [str(BIN / "dvc"), "config", "core.analytics", "false"]):
        subprocess.run(cmd, cwd=ws, check=True, env=ENV, capture_output=True)
    return ws


def timed(cmd: list[str], cwd: Path, env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each way; the median is printed")
    ap.add_argument("--before", metavar="REF", help="also time (3), (4) and (5) with the code of this git commit")
    ap.add_argument("--direct", type=Path, help=argparse.SUPPRESS)  # internal: run way (1) in this workspace
    args = ap.parse_args()
    if args.direct:
        direct(args.direct)
        return
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["sample"]["n_images"] = args.images
    params["train"]["epochs"] = args.epochs
    runs: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for i in range(args.repeats):  # the ways interleaved: a slower minute of the machine hits all of them
            for key, seconds in once(tmp / str(i), params, args.before).items():
                runs.setdefault(key, []).append(seconds)
    rows = {key: statistics.median(values) for key, values in runs.items()}
    print(f"tiny pipeline: {args.images} sample images, {args.epochs} epoch(s); wall seconds, the median of "
          f"{args.repeats} run(s) each (lowest-highest)")
    for key, label in (("direct", "(1) stage functions called directly"), ("dvc", "(2) dvc repro"),
                       ("prefect", "(3) multitag run (Prefect flow over DVC)"),
                       ("again", "(4) multitag run again, nothing changed"),
                       ("home", "(5) multitag run, Prefect home not new"),
                       ("before", f"(3) at {args.before}"), ("before-again", f"(4) at {args.before}"),
                       ("before-home", f"(5) at {args.before}")):
        if key in rows:
            print(f"{label:<44}{rows[key]:>8.1f}   ({min(runs[key]):.1f}-{max(runs[key]):.1f})")
    print(f"DVC adds {rows['dvc'] - rows['direct']:.1f} s, Prefect adds {rows['prefect'] - rows['dvc']:.1f} s more; "
          f"ratio flow / direct: {rows['prefect'] / rows['direct']:.2f} (new Prefect home), "
          f"{rows['home'] / rows['direct']:.2f} (not new)"
          + (f" (at {args.before}: {rows['before'] / rows['direct']:.2f}, {rows['before-home'] / rows['direct']:.2f})"
             if args.before else ""))


def once(tmp: Path, params: dict, ref: str | None) -> dict:
    """Each way once, in new workspaces under ``tmp``: wall seconds by row."""
    tmp.mkdir()
    env = {**ENV, "PREFECT_HOME": str(tmp / "prefect-home")}
    rows = {
        "direct": timed([sys.executable, __file__, "--direct", str(workspace(tmp, "direct", params))], ROOT, env),
        "dvc": timed([str(BIN / "dvc"), "repro"], workspace(tmp, "dvc", params), env),
        "prefect": timed([str(BIN / "multitag"), "run"], workspace(tmp, "prefect", params), env),
    }
    rows["again"] = timed([str(BIN / "multitag"), "run"], tmp / "prefect", env)
    rows["home"] = timed([str(BIN / "multitag"), "run"], workspace(tmp, "home", params), env)
    if ref:
        rows.update(before(ref, tmp, params, env))
    return rows


def before(ref: str, tmp: Path, params: dict, env: dict) -> dict:
    """Rows (3), (4) and (5) with the code of git commit ``ref``."""
    code = tmp / "code-before"
    subprocess.run(["git", "worktree", "add", "-q", "--detach", str(code), ref], cwd=ROOT, check=True)
    try:
        env = {**env, "PYTHONPATH": str(code), "PREFECT_HOME": str(tmp / "prefect-home-before")}
        ws = workspace(tmp, "before", params, code)
        run = [sys.executable, "-m", "multitag.cli", "run"]  # its command, whatever this install's script calls
        return {"before": timed(run, ws, env), "before-again": timed(run, ws, env),
                "before-home": timed(run, workspace(tmp, "before-home", params, code), env)}
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(code)], cwd=ROOT, check=True)


if __name__ == "__main__":
    main()
