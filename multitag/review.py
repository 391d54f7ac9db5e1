"""Label review stage: which annotations are probably wrong.

Every labelled image gets an out-of-sample probability for every label: the images are cut into
``review.folds`` folds by content hash, and for each fold a model is trained with the configured
recipe on the other folds (``review.time_budget_s`` seconds each, or ``train``'s epochs) and scores
the fold it never saw. cleanlab then ranks the images (``get_label_quality_scores``, pooled by the
image's worst label, which its multi-label benchmark found ahead of the default) and flags likely
issues (``find_label_issues`` with ``multi_label=True``). For each image the likely missing labels
(not given, predicted >= ``review.threshold``) and likely extra ones (given, predicted below
``1 - review.threshold``) are named.

Outputs: ``reports/label_issues.csv`` (every image, worst first: given labels, likely missing,
likely extra, the suggested labels, quality score, whether flagged, and an empty ``accept`` column
for a person to fill), ``reports/plots/label_issues.png`` (a contact sheet of the top suspects with
given vs suggested labels), ``reports/review.json`` (DVC metrics). ``multitag review export`` turns
the accepted rows into an inbox batch (multitag/inbox.py): corrections are versioned like any other batch.

With ``review.enabled: false`` (the default) the stage writes the three files saying so, at once.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from multitag.config import Params, TrainParams
from multitag.dataset import load_split, select_device
from multitag.layout import Layout
from multitag.metrics import mean_ap
from multitag.report import contact_sheet, read_json, write_csv, write_json

log = logging.getLogger(__name__)

COLUMNS = ["image", "sha256", "given", "likely_missing", "likely_extra", "suggested", "quality", "flagged", "accept"]
# Below this held-out mAP of the fold models, a warning says the flags are not to be trusted: on the
# hard benchmark (held-out mAP about 0.2) 6% of the flagged images were wrong ones, on the sample data
# (about 0.99) 88% (bench/review.py).
WEAK_MODELS = 0.6


def fold_of(digest: str, folds: int) -> int:
    """A fold from the content hash (another part of it than the split uses)."""
    return int(digest[16:24], 16) % folds


def out_of_sample(p: TrainParams, layout: Layout, x: np.ndarray, manifest: pd.DataFrame, folds: int,
                  time_budget_s: float | None) -> np.ndarray:
    """(images, labels) probabilities for the images ``x`` of the whole ``manifest`` (its rows in
    order), each image's from a model trained without it."""
    from multitag.models import load_model_file, predict_scores
    from multitag.train import train

    fold = np.array([fold_of(d, folds) for d in manifest["sha256"]])
    probs = np.full((len(manifest), len(read_json(layout.vocabulary)["labels"])), np.nan, np.float32)
    params = p.model_copy(update={"time_budget_s": time_budget_s} if time_budget_s else {})
    device = select_device(p.device)
    for k in range(folds):
        with tempfile.TemporaryDirectory() as tmp:
            ws = Layout(tmp)
            ws.prepared.mkdir(parents=True)
            (ws.prepared / "shards").symlink_to(layout.shards.resolve(), target_is_directory=True)
            ws.labels.mkdir(parents=True)
            shutil.copy(layout.vocabulary, ws.vocabulary)
            shutil.copy(layout.targets, ws.targets)
            rest = np.flatnonzero(fold != k)
            val = rest[np.array([int(manifest["sha256"][i][24:32], 16) % 10 == 0 for i in rest], bool)]  # 10%
            split = np.full(len(manifest), "train", dtype=object)
            split[val], split[fold == k] = "val", "test"
            manifest.assign(split=split).to_parquet(ws.manifest, index=False)
            log.info("review fold %d/%d: training on %d images, scoring %d", k + 1, folds, len(rest), (fold == k).sum())
            train(params, ws)
            model, meta = load_model_file(ws.model, device)
            probs[fold == k] = predict_scores(model, x[fold == k], device, tta=meta["tta"])
    return probs


def find_issues(y: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> pd.DataFrame:
    """Per image: cleanlab's quality score (low = likely wrong), whether cleanlab flags it, and the
    labels likely missing and likely extra."""
    from cleanlab.filter import find_label_issues
    from cleanlab.multilabel_classification import get_label_quality_scores

    given = [list(np.flatnonzero(row)) for row in y]
    quality = get_label_quality_scores(given, probs, aggregator_kwargs={"method": "softmin"})
    flagged = np.zeros(len(y), bool)
    if y.any(axis=0).sum() >= 2:  # cleanlab's multi-label filter needs two classes with examples
        flagged[find_label_issues(given, probs, multi_label=True)] = True
    missing = (y == 0) & (probs >= threshold)
    extra = (y == 1) & (probs < 1 - threshold)
    return pd.DataFrame({"quality": quality, "flagged": flagged, "missing": list(missing), "extra": list(extra)})


def review(params: Params, layout: Layout) -> dict:
    """Rank every labelled image's annotations (see the module docstring); writes the report, the
    contact sheet and reports/review.json."""
    r = params.review
    out_csv, sheet, summary = layout.label_issues, layout.label_issues_plot, layout.review_summary
    if not r.enabled:
        write_csv(out_csv, COLUMNS, [])
        _contact_sheet(pd.DataFrame(), None, None, sheet, "label review is off (review.enabled: false)")
        result = {"enabled": False, "images": 0, "flagged": 0}
        write_json(summary, result)
        return result
    start = time.time()
    x, y, manifest = load_split(layout, None)
    x, y = x.numpy(), y.numpy().astype(np.uint8)
    labels = read_json(layout.vocabulary)["labels"]
    probs = out_of_sample(params.train, layout, x, manifest, r.folds, r.time_budget_s)
    found = find_issues(y, probs, r.threshold)
    heldout = mean_ap(y, probs)
    names = np.array(labels, dtype=object)

    def words(mask):
        return " ".join(names[mask])
    rows = []
    for i in np.argsort(found["quality"].to_numpy(), kind="stable"):
        given, miss, extra = y[i].astype(bool), found["missing"][i], found["extra"][i]
        rows.append([manifest["source"][i], manifest["sha256"][i], words(given), words(miss), words(extra),
                     words((given | miss) & ~extra), round(float(found["quality"][i]), 5),
                     "yes" if found["flagged"][i] else "", ""])
    write_csv(out_csv, COLUMNS, rows, for_people=True)
    table = pd.DataFrame(rows, columns=COLUMNS)
    _contact_sheet(table, x, manifest, sheet, "", heldout)
    result = {"enabled": True, "images": len(rows), "flagged": int(found["flagged"].sum()), "folds": r.folds,
              "heldout_map": round(heldout, 4) if heldout == heldout else None,
              "with_likely_missing": int(np.any(np.stack(found["missing"]), axis=1).sum()) if rows else 0,
              "with_likely_extra": int(np.any(np.stack(found["extra"]), axis=1).sum()) if rows else 0}
    write_json(summary, result)
    log.info("label review: %d of %d images flagged (%d folds, %.0f s; the fold models' held-out mAP %.3f); "
             "worst first in %s", result["flagged"], len(rows), r.folds, time.time() - start, heldout, out_csv)
    if heldout < WEAK_MODELS:
        log.warning("label review: the fold models reach only %.2f held-out mAP, so most of the %d flags are "
                    "probably the models' errors, not the labels': use a stronger recipe (train.*, more "
                    "review.folds or review.time_budget_s) before acting on them", heldout, result["flagged"])
    return result


def _contact_sheet(table: pd.DataFrame, x, manifest, path: Path, message: str, heldout: float | None = None,
                   top: int = 24) -> None:
    suspects = table.head(top)
    where = {d: i for i, d in enumerate(manifest["sha256"])} if len(suspects) else {}
    contact_sheet([x[where[d]] for d in suspects["sha256"]] if len(suspects) else [],
                  [f"{row['image'][:22]}\ngiven: {row['given'][:30] or '-'}\nsuggested: {row['suggested'][:30] or '-'}"
                   for _, row in suspects.iterrows()],
                  path, "label review: the images whose labels look least right (flagged ones in red)"
                  + (f"; the fold models' held-out mAP {heldout:.2f}" if heldout is not None else ""),
                  ["darkred" if row["flagged"] else "black" for _, row in suspects.iterrows()], message or "no images")


def run(params: Params, layout: Layout) -> dict:
    """The review stage as dvc.yaml runs it."""
    return review(params, layout)

