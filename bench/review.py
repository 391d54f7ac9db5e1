"""Label review against errors injected on purpose: does it find them, and does fixing what it flags
help the model?

    .venv/bin/python bench/review.py --data sample --images 3000 --noise 0.05 --folds 5 --sheet docs/label-issues.png

On a clean data set, a share ``--noise`` of the images gets one error each (seeded): a true label
dropped (two times in three: missing tags are the common error) or a false one added. The review
stage's out-of-sample probabilities and cleanlab then flag images; printed: precision and recall of
the flagged images against the corrupted ones, cleanlab's ranking AUROC, and AP of the top ranks
(AP@T, T = the number corrupted), as its multi-label benchmark reports them. Then a model is trained
on the noisy labels and one on the labels with the flagged images' suggestions applied (what a
person accepting every suggestion would get), both scored on the clean test split.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from multitag.config import SampleParams, load_params
from multitag.evaluate import evaluate
from multitag.ingest import ingest
from multitag.labels import make_labels
from multitag.layout import Layout, read_manifest
from multitag.report import read_csv_rows, read_json
from multitag.review import review
from multitag.sample_data import write_sample_data
from multitag.train import train

ROOT = Path(__file__).resolve().parents[1]


def corrupt(y: np.ndarray, share: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(noisy targets, indices corrupted): one error per chosen image, test images left clean."""
    rng = np.random.default_rng(seed)
    noisy = y.copy()
    chosen = rng.choice(len(y), int(round(share * len(y))), replace=False)
    for i in chosen:
        if noisy[i].any() and rng.random() < 2 / 3:
            noisy[i, rng.choice(np.flatnonzero(noisy[i]))] = 0
        else:
            noisy[i, rng.choice(np.flatnonzero(noisy[i] == 0))] = 1
    return noisy, chosen


def test_map(params, ws: Layout, targets: np.ndarray, clean: np.ndarray, test: np.ndarray) -> float:
    """Train on ``targets`` (test rows clean), evaluate on the clean test split."""
    np.save(ws.targets, np.where(test[:, None], clean, targets))
    for f in (ws.model, ws.checkpoint):
        f.unlink(missing_ok=True)
    train(params.train, ws)
    return evaluate(params.evaluate, ws)["test"]["map"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=["sample", "hard"], default="sample")
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--noise", type=float, default=0.05)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--sheet", type=Path, help="copy the review's contact sheet (label_issues.png) here")
    args = ap.parse_args()
    params = load_params(ROOT / "params.yaml")
    params = params.model_copy(update={"review": params.review.model_copy(update={"enabled": True, "folds": args.folds})})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sample = SampleParams(preset="digits" if args.data == "sample" else "hard", n_images=args.images,
                              image_size=64 if args.data == "sample" else 128, missing_tags=0.0)
        write_sample_data(sample, tmp / "data", params.ingest.val_fraction, params.ingest.test_fraction)
        ws = Layout(tmp / "ws")
        ingest(params.ingest.model_copy(update={"annotations": str(tmp / "data/annotations.csv"),
                                                "images": str(tmp / "data/images")}), ws)
        make_labels(ws)
        clean = np.load(ws.targets)
        test = (read_manifest(ws)["split"] == "test").to_numpy()
        reviewable = np.flatnonzero(~test)
        noisy = clean.copy()
        sub, chosen = corrupt(clean[reviewable], args.noise)
        noisy[reviewable] = sub
        corrupted = np.zeros(len(clean), bool)
        corrupted[reviewable[chosen]] = True
        np.save(ws.targets, noisy)
        start = time.perf_counter()
        review(params, ws)
        seconds = time.perf_counter() - start
        if args.sheet:
            shutil.copy(ws.label_issues_plot, args.sheet)
        rows = {r["sha256"]: r for r in read_csv_rows(ws.label_issues)}
        manifest = read_manifest(ws)
        keep = ~test
        quality = np.array([float(rows[d]["quality"]) for d in manifest["sha256"]])[keep]
        flagged = np.array([rows[d]["flagged"] == "yes" for d in manifest["sha256"]])[keep]
        truth = corrupted[keep]
        t = int(truth.sum())
        top = np.zeros(keep.sum(), bool)
        top[np.argsort(quality, kind="stable")[:t]] = True
        precision = (flagged & truth).sum() / max(flagged.sum(), 1)
        recall = (flagged & truth).sum() / max(t, 1)
        auroc = roc_auc_score(truth, -quality)
        ap_t = average_precision_score(truth[np.argsort(quality)[:t]], -quality[np.argsort(quality)[:t]]) \
            if truth[np.argsort(quality)[:t]].any() else 0.0
        fixed = noisy.copy()
        names = np.array(read_json(ws.vocabulary)["labels"], dtype=object)
        for i, d in enumerate(manifest["sha256"]):
            if rows[d]["flagged"] == "yes":
                fixed[i] = np.isin(names, rows[d]["suggested"].split())
        noisy_map = test_map(params, ws, noisy, clean, test)
        fixed_map = test_map(params, ws, fixed, clean, test)
        clean_map = test_map(params, ws, clean, clean, test)
    print(f"data: {args.data}, {len(clean)} images ({keep.sum()} reviewed, {t} corrupted: {args.noise:.0%}), "
          f"{clean.shape[1]} labels; {args.folds} folds, review took {seconds:.0f} s")
    print(f"flagged {int(flagged.sum())}: precision {precision:.3f}, recall {recall:.3f}; ranking AUROC {auroc:.3f}, "
          f"AP@T {ap_t:.3f}; top-T precision {(top & truth).sum() / max(t, 1):.3f}")
    print(f"test mAP: noisy labels {noisy_map:.4f}, flagged suggestions applied {fixed_map:.4f}, clean labels {clean_map:.4f}")
    print(f"ratio: precision {precision:.2f} at recall {recall:.2f}; mAP change from fixing {100 * (fixed_map - noisy_map):+.2f} points")


if __name__ == "__main__":
    main()
