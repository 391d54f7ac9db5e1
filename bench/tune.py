"""The default recipe against `multitag tune`, side by side in one run, on the user's path.

    .venv/bin/python bench/tune.py --data hard --images 4000 --budget 20m
    .venv/bin/python bench/tune.py --data sample --budget 20m

In one fresh git + DVC workspace (the hard set: `sample.preset hard`, the photo defaults, i.e.
params.yaml's train and tune sections for photos; the sample data: the repository's params.yaml):

1. `multitag run`: the default recipe, its test mAP;
2. `multitag tune --budget B`: the search (the baseline, the workspace's recipe as `multitag run`
   trains it, then Optuna's trials, the first of them that recipe at the trial's time), scored on
   the validation split;
3. `multitag tune --trials 0 --apply`, then `multitag run`: the tuned recipe trained by the pipeline
   as a user would, its test mAP.

Prints both test mAPs and their difference in points, the tune's own figures (baseline and best
trial, val and test), and when the search had reached 90% of its final validation gain over the
baseline (seconds into the tune).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml

from overhead import BIN, ENV, ROOT, timed, workspace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=["hard", "sample"], default="hard")
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--budget", default="20m")
    a = ap.parse_args()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["sample"]["n_images"] = a.images
    if a.data == "hard":  # photos: the defaults of train.augment and tune.augment (the repo's are the digits')
        params["sample"].update(preset="hard", image_size=128)
        del params["train"]["augment"]
        del params["tune"]["augment"]
    with tempfile.TemporaryDirectory() as tmp:
        ws = workspace(Path(tmp), "ws", params)
        multitag = str(BIN / "multitag")
        default_s = timed([multitag, "run"], ws, ENV)
        default = json.loads((ws / "reports/metrics.json").read_text())["test"]["map"]
        print(f"data: {a.data}, {a.images} images; default recipe: test mAP {default:.4f} ({default_s:.0f} s run)",
              flush=True)
        start = time.perf_counter()
        timed([multitag, "tune", "--budget", a.budget], ws, ENV)
        tune_s = time.perf_counter() - start
        timed([multitag, "tune", "--trials", "0", "--apply"], ws, ENV)
        tuned_s = timed([multitag, "run"], ws, ENV)
        tuned = json.loads((ws / "reports/metrics.json").read_text())["test"]["map"]
        report(ws, a, default, tuned, tune_s, tuned_s)


def report(ws: Path, a, default: float, tuned: float, tune_s: float, tuned_s: float) -> None:
    from multitag.config import load_params
    from multitag.layout import Layout
    from multitag.tune import best_trial, open_study

    layout = Layout(ws)
    study = open_study(layout, load_params(layout.params).tune)
    trials = study.get_trials(deepcopy=False)
    baseline, best = study.user_attrs["baseline"], best_trial(study)
    states = [t.state.name.lower() for t in trials]
    print(f"tune --budget {a.budget}: {tune_s:.0f} s, {len(trials)} trials ({states.count('complete')} finished, "
          f"{states.count('pruned')} pruned, {states.count('fail')} failed) of {study.user_attrs['trial_s']:.0f} s "
          f"each, after the baseline")
    print(f"  baseline (the workspace's recipe as `multitag run` trains it, {baseline.get('epochs')} epochs): "
          f"val mAP {baseline.get('val_map')}")
    if best is not None:
        gain = best.value - (baseline.get("val_map") or 0.0)
        reached = min((t.user_attrs["finished_s"] for t in trials if t.value is not None and t.state.name == "COMPLETE"
                       and t.value - (baseline.get("val_map") or 0.0) >= 0.9 * gain), default=None)
        print(f"  best trial {best.number}: val mAP {best.value:.4f} ({gain * 100:+.1f} points over the baseline), "
              f"90% of that gain reached {reached:.0f} s into the tune" if gain > 0 else
              f"  best trial {best.number}: val mAP {best.value:.4f}, not above the baseline")
        print(f"  its recipe: {best.user_attrs['recipe']}")
    print(f"tuned recipe through the pipeline: test mAP {tuned:.4f} ({tuned_s:.0f} s run)")
    print(f"ratio: tuned - default = {(tuned - default) * 100:+.1f} test mAP points "
          f"({tuned:.4f} vs {default:.4f}) on {a.data}")


if __name__ == "__main__":
    main()
