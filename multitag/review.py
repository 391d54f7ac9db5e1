"""Label review stage: which annotations are probably wrong.

Every labelled image gets an out-of-sample probability for every label: the images are cut into
``review.folds`` folds by content hash, and for each fold a model is trained with the configured
recipe on the other folds (``review.time_budget_s`` seconds each, else ``train``'s time budget if
set, else ``review.epochs``: by default twice ``train``'s) and scores the fold it never saw; with
``review.repeats`` > 1 that is done again along other parts of the hash and the probabilities
averaged, and so are the votes of its look-alikes (``neighbour_votes``: the given labels of its
nearest training images in each fold model's feature space). Each label's probabilities are read
beside those votes and the image's other given labels (``in_context``: what a model's confusions and
the labels that go together say), then calibrated against the annotations while estimating how often
those are wrong (``doubts``: EM under label flips), which ranks the images, sizes the flagged set by
the expected number of wrong images (or the number with a chance of at least 0.3, when more), and
names the likely missing and likely extra labels (``find_issues``). cleanlab's multi-label ranking
and filter, which this stage used before, flagged 2.3-10 times the errors injected where the fold
models reached 0.6-0.9 held-out mAP (bench/review.py prints both; bench/RESULTS.md).

Outputs: ``reports/label_issues.csv`` (every image, worst first: given labels, likely missing,
likely extra, the suggested labels, quality score, the chance that a label is wrong, whether flagged,
and an empty ``accept`` column for a person to fill), ``reports/plots/label_issues.png`` (a contact
sheet of the top suspects with given vs suggested labels), ``reports/review.json`` (DVC metrics). ``multitag review export`` turns
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
import torch
from scipy.special import expit, logit

from multitag.config import Params, TrainParams
from multitag.dataset import load_split, select_device
from multitag.layout import Layout
from multitag.metrics import mean_ap
from multitag.report import contact_sheet, read_json, write_csv, write_json

log = logging.getLogger(__name__)

COLUMNS = ["image", "sha256", "given", "likely_missing", "likely_extra", "suggested", "quality", "chance", "flagged",
           "accept"]
# Below this held-out mAP of the fold models, a warning says the ranking is not to be trusted: on the
# sample data with 5% of the images given a wrong label, fold models at 0.59 held-out mAP put 42% of
# corrupted images among the worst-ranked (as many as corrupted), at 0.76-0.79 55-60%, at 0.83-0.90
# 59-65%, at 0.98 86% (bench/review.py and bench/RESULTS.md).
WEAK_MODELS = 0.6
# Every image whose chance of a wrong label is at least this is flagged, beyond the expected number:
# where the fold models are sure (0.93-0.98 held-out mAP), the chances are sharp and their sum missed
# errors at 0.3-0.5 (recall 0.835 -> 0.901 at precision 0.953 -> 0.956 on the easy data); at 0.58-0.92
# and on clean labels, the sum was the larger count on every saved run (bench/RESULTS.md).
LIKELY = 0.3
# How many of its nearest training images, in a fold model's feature space, vote on each scored image
# (neighbour_votes). 10 ranked best of 5, 10 and 20 on two saved runs; not tuned further.
NEIGHBOURS = 10


# the parts of an image's content hash that draw its fold in each repeat (the split uses [:16])
FOLD_HASH = [slice(16, 24), slice(40, 48), slice(48, 56), slice(56, 64), slice(32, 40)]


def fold_of(digest: str, folds: int, repeat: int = 0) -> int:
    """An image's fold in the ``repeat``-th drawing, from its content hash."""
    return int(digest[FOLD_HASH[repeat]], 16) % folds


def out_of_sample(params: Params, layout: Layout, manifest: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, votes), each (images, labels), for the images of the whole ``manifest`` (its rows
    in order), each image's the mean of ``review.repeats`` models' trained without it: the images are
    cut into ``review.folds`` folds ``repeats`` times, each time along another part of their hash. The
    votes are what the image's nearest training images in each model's feature space were given
    (``fold_models``). With ``compute.dask`` set the fold models train at once, each a task on that
    cluster (its workers read the prepared data at this machine's paths: a shared file system); else
    one after another here."""
    from multitag.compute import executor, map_chunks

    r, recipe = params.review, fold_recipe(params)
    drawings = [np.array([fold_of(d, r.folds, i) for d in manifest["sha256"]]) for i in range(r.repeats)]
    cuts = [(fold, k) for fold in drawings for k in range(r.folds)]
    jobs = [(recipe, str(layout.root.resolve()), manifest, fold, k) for fold, k in cuts]
    probs = np.zeros((len(manifest), len(read_json(layout.vocabulary)["labels"])), np.float32)
    votes = np.zeros_like(probs)
    with executor(params.compute, local_workers=1) as pool:
        for n, ((fold, k), [(scores, voted, where)]) in enumerate(zip(cuts, map_chunks(fold_models, jobs, pool, 1,
                                                                                        params.compute))):
            probs[fold == k] += scores / r.repeats
            votes[fold == k] += voted / r.repeats
            log.info("review fold model %d/%d: scored %d images (trained %s)", n + 1, len(cuts), len(scores), where)
    return probs, votes


def fold_recipe(params: Params) -> TrainParams:
    """The recipe each fold model trains: train's, for ``review.time_budget_s`` seconds, else train's
    time budget if set, else ``review.epochs`` (by default twice train's). Trained longer, fold models
    rank far better where the pipeline's epochs leave them short of what the data allows (2,000 sample
    images, 5% corrupted, 5 x 2 folds: held-out mAP 0.889 -> 0.981, precision 0.704 -> 0.950, recall
    0.625 -> 0.950; bench/RESULTS.md)."""
    r = params.review
    return params.train.model_copy(update={"epochs": r.epochs or 2 * params.train.epochs,
                                           **({"time_budget_s": r.time_budget_s} if r.time_budget_s else {})})


def fold_models(jobs: list[tuple]) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """For each (recipe, workspace root, manifest, fold of each image, k): a model trained on all the
    other folds, its probabilities for fold k's images, their neighbours' votes (``neighbour_votes`` in
    the model's feature space, ``embed``, over the images it trained on) and where it trained
    (a Dask worker's address, or "here").

    No validation share: without one, training runs its schedule to the end and keeps its last weights
    (train.py), and each fold model learns from every image it may see. On few images a model can
    learn slowly for many epochs before it climbs, and early stopping (train.patience) ended fold
    models in that stretch; a 10% validation share also cost each a tenth of its images. On 1,100
    sample images (5% corrupted) early stopping alone took the fold models' held-out mAP from 0.922 to
    0.861; on 1,000, the validation share, without early stopping, took it from 0.951 and 0.947 to 0.896
    and 0.882 (bench/RESULTS.md)."""
    from multitag.models import load_model_file, predict_scores
    from multitag.train import train

    out = []
    for recipe, root, manifest, fold, k in jobs:
        layout, device = Layout(root), select_device(recipe.device)
        with tempfile.TemporaryDirectory() as tmp:
            ws = Layout(tmp)
            ws.prepared.mkdir(parents=True)
            (ws.prepared / "shards").symlink_to(layout.shards.resolve(), target_is_directory=True)
            ws.labels.mkdir(parents=True)
            shutil.copy(layout.vocabulary, ws.vocabulary)
            shutil.copy(layout.targets, ws.targets)
            split = np.where(fold == k, "test", "train").astype(object)
            manifest.assign(split=split).to_parquet(ws.manifest, index=False)
            log.info("review fold %d: training on %d images", k + 1, int((fold != k).sum()))
            train(recipe, ws)
            model, meta = load_model_file(ws.model, device)
            images, given, _ = load_split(ws, None)
            images, given, held = images.numpy(), given.numpy(), fold == k
            feats = embed(model, images, device)
            out.append((predict_scores(model, images[held], device, tta=meta["tta"]),
                        neighbour_votes(feats[~held], given[~held], feats[held]), _where()))
    return out


def embed(model, images: np.ndarray | torch.Tensor, device: torch.device, batch_size: int = 256) -> np.ndarray:
    """Each image's features as the model's label head reads them, (images, features) float32: the
    input of its last nn.Linear (the label layer), for an ML-Decoder head the backbone's spatial
    features averaged over the image, and for a model without a Linear layer (SqueezeNet's label layer
    is a convolution) its logits. A hook reads them during ``predict_scores``' forward passes (on a GPU,
    at the precision the images are scored at)."""
    from multitag.models import DecoderNet, predict_scores

    decoder = isinstance(model.backbone, DecoderNet)
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    head = model.backbone.decoder if decoder else linear[-1] if linear else None
    got: list[torch.Tensor] = []
    hook = (model.backbone if head is None else head).register_forward_hook(
        lambda module, inputs, output: got.append((output if head is None else inputs[0]).float()))
    try:
        predict_scores(model, images, device, batch_size=batch_size)
    finally:
        hook.remove()
    feats = [(f.mean(dim=(2, 3)) if decoder else f.flatten(1)).cpu() for f in got]
    return torch.cat(feats).numpy() if feats else np.zeros((0, 0), np.float32)


def neighbour_votes(known: np.ndarray, labels: np.ndarray, asked: np.ndarray, k: int = NEIGHBOURS,
                    block: int = 1024) -> np.ndarray:
    """(asked images, labels): the mean ``labels`` of each ``asked`` image's ``k`` nearest ``known``
    images by cosine similarity of their features, ``block`` asked images at a time.

    A fold model's probability is one reading of an image; the images that look most like it to the
    same model carry annotations of their own. Where a label's probability is unsure, what the
    look-alikes were given is further evidence, which ``in_context`` weighs per label against the
    annotations. On 3,000 sample images with 5% of them corrupted and fold models at 0.87 held-out
    mAP, it raised the share of errors among the worst-ranked from 0.650 and 0.692 to 0.700 and 0.767
    (two seeds; bench/RESULTS.md)."""
    def unit(f):
        return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    known, asked, k = unit(known.astype(np.float32)), unit(asked.astype(np.float32)), min(k, len(known))
    out = np.zeros((len(asked), labels.shape[1]), np.float32)
    for start in range(0, len(asked) if k else 0, block):
        nearest = np.argpartition(-(asked[start:start + block] @ known.T), k - 1, axis=1)[:, :k]
        out[start:start + block] = labels[nearest].mean(axis=1)
    return out


def _where() -> str:
    try:
        from distributed import get_worker
        return f"on the Dask worker {get_worker().address}"
    except (ImportError, ValueError):  # not on a worker
        return "here"


def in_context(y: np.ndarray, probs: np.ndarray, votes: np.ndarray | None = None, partners: int = 8,
               folds: int = 5) -> np.ndarray:
    """``probs`` (images, labels) recalibrated per label against the annotations with the image's other
    given labels beside it: a logistic regression on ln p, -ln(1-p), the logit of the neighbours'
    ``votes`` for the label (clipped to 0.05-0.95; ``neighbour_votes``) if given, and whether each of
    the label's ``partners`` (the other labels, or for many labels those whose annotation goes most
    with this label's probability) is given, fitted on the other ``folds`` - 1 parts of the images and
    applied to the remaining part, so no image's own annotation fits its own recalibration.

    It reads what the fold models' probabilities mean beside the other labels: a model that mistakes
    one label for another raises the first wherever the second is given, and labels that go together
    make each other likelier. On the sample data at 0.83-0.90 held-out mAP with 5% of the images
    corrupted it raised the ranking's AUROC from 0.87-0.90 to 0.94-0.95 and the share of the errors
    flagged from 0.44-0.49 to 0.56-0.60 (bench/RESULTS.md)."""
    g, p = y.astype(np.float64), _clipped(probs)
    n, count = g.shape
    if count - 1 <= partners:
        pick = np.array([[j for j in range(count) if j != label] for label in range(count)], int).reshape(count, -1)
    else:  # by |correlation| of the partner's annotation with the label's logit
        z = logit(p)
        corr = np.abs(((g - g.mean(0)) / (g.std(0) + 1e-9)).T @ ((z - z.mean(0)) / (z.std(0) + 1e-9)))
        np.fill_diagonal(corr, -np.inf)
        pick = np.argsort(-corr, axis=0)[:partners].T
    part = np.arange(n) % folds
    out = probs.astype(np.float64)
    learnable = np.flatnonzero(g.min(axis=0) < g.max(axis=0))
    blocks = -(-len(learnable) * n // 2_000_000)  # labels a few at a time: at most 2M (image, label) cells
    for block in np.array_split(learnable, max(1, blocks)):
        voted = [] if votes is None else [logit(np.clip(votes[:, block], 0.05, 0.95))[..., None]]
        x = np.concatenate([_beta(p[:, block]), *voted, g[:, pick[block]]], axis=-1)  # (images, labels, features)
        for k in range(folds if n >= 2 * folds else 0):
            theta = _calibrate(x[part != k], g[part != k][:, block], np.zeros((len(block), x.shape[-1])), steps=8)
            out[np.ix_(part == k, block)] = expit(np.einsum("nlk,lk->nl", x[part == k], theta))
    return out


def doubts(y: np.ndarray, probs: np.ndarray, rounds: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """(wrong, shows), each (images, labels): the estimated chance that each annotation is wrong, and
    the calibrated chance that the image shows each label (from its probability alone).

    The fold models' probabilities do not mean the same on every label: a label the models learn well
    puts its negatives near 0, a weak one scatters them up to 0.9. So each label's probabilities are
    calibrated (beta calibration: a logistic regression on ln p and -ln(1-p)) against whether the image
    shows the label, which is not known: the annotations are, and they are wrong at two rates shared by
    the labels, P(not given | shows it) and P(given | does not show it). EM fits both (the standard
    model of class-conditional label flips): each image's chance of showing the label from the
    calibration and its annotation, then the calibrations on those chances and the rates from them,
    until the rates settle. On a clean data set both rates go to 0, so (almost) nothing is flagged,
    however weak the models.
    """
    g = y.astype(np.float64)
    x = _beta(_clipped(probs))  # (images, labels, 3)
    theta = np.zeros((g.shape[1], 3))
    posterior, missed, added = g.copy(), 0.01, 0.01  # P(shows | probability, annotation), the two rates
    learnable = g.min(axis=0) < g.max(axis=0)
    for _ in range(rounds):
        theta = _calibrate(x, posterior, theta)
        c = np.where(learnable, expit(np.einsum("nlk,lk->nl", x, theta)), g)
        posterior = np.where(g == 1, (1 - missed) * c / ((1 - missed) * c + added * (1 - c)),
                             missed * c / (missed * c + (1 - added) * (1 - c)))
        before = missed, added
        missed = ((1 - g) * posterior).sum() / max(posterior.sum(), 1e-12)
        added = (g * (1 - posterior)).sum() / max((1 - posterior).sum(), 1e-12)
        if max(abs(missed - before[0]), abs(added - before[1])) < 1e-6:
            break
    return np.where(g == 1, 1 - posterior, posterior), c


def _clipped(probs: np.ndarray) -> np.ndarray:
    return np.clip(probs.astype(np.float64), 1e-4, 1 - 1e-4)  # float32 sigmoids saturate at 0 and 1


def _beta(p: np.ndarray) -> np.ndarray:
    """Beta calibration's features of probabilities (images, labels): (images, labels, 3), a constant,
    ln p and -ln(1-p)."""
    return np.stack([np.ones_like(p), np.log(p), -np.log1p(-p)], axis=-1)


def _calibrate(x: np.ndarray, target: np.ndarray, theta: np.ndarray, steps: int = 5) -> np.ndarray:
    """Logistic regressions of soft ``target`` (images, labels) on ``x`` (images, labels, features), one
    per label, all at once: Newton steps from ``theta``, an L2 penalty of 1 on all but the intercept
    (scikit-learn's C=1)."""
    penalty = np.diag([0.0] + [1.0] * (x.shape[-1] - 1))
    for _ in range(steps):
        q = expit(np.einsum("nlk,lk->nl", x, theta))
        grad = np.einsum("nlk,nl->lk", x, target - q) - theta @ penalty
        hess = np.einsum("nlk,nl,nlm->lkm", x, q * (1 - q), x) + penalty + 1e-9 * np.eye(x.shape[-1])
        theta = theta + np.linalg.solve(hess, grad[..., None])[..., 0]
    return theta


def find_issues(y: np.ndarray, probs: np.ndarray, threshold: float = 0.5, context: bool = True,
                votes: np.ndarray | None = None) -> pd.DataFrame:
    """Per image: ``quality`` (low = likely wrong: the ranking, by the annotation whose calibrated
    probability fits the other side best, as a likelihood ratio against the label's base rate),
    ``chance`` (the estimated chance that some given label is wrong), whether it is flagged, and the
    labels likely missing and likely extra (the calibrated chance that the image shows the label at
    least ``threshold``, or below 1 - ``threshold``, against the annotation).

    The flagged images are the worst-ranked ones, as many as the chances add up to (the expected number
    of images with a wrong label, so the flags follow the data's error rate, not the models'), or as
    many as have a chance of at least ``LIKELY``, whichever is more. A flagged image names at least its
    most doubtful label. The probabilities are first read beside the image's other given labels
    (``in_context``, with the neighbours' ``votes`` if given; ``context=False`` skips that, for
    comparison).
    """
    if not len(y):
        return pd.DataFrame({"quality": [], "chance": [], "flagged": [], "missing": [], "extra": []})
    wrong, shows = doubts(y, in_context(y, probs, votes) if context else probs)
    ratio = logit(np.clip(shows, 1e-9, 1 - 1e-9)) - logit(np.clip(shows.mean(axis=0), 1e-9, 1 - 1e-9))
    evidence = np.where(y == 1, -ratio, ratio)
    strongest = evidence.max(axis=1, initial=-np.inf)  # -inf: no labels at all
    chance = 0.0 - np.expm1(np.log1p(-np.minimum(wrong, 1 - 1e-12)).sum(axis=1))  # tiny chances kept; no -0.0
    flagged = np.zeros(len(y), bool)
    count = max(int(round(chance.sum())), int((chance >= LIKELY).sum()))
    flagged[np.argsort(-strongest, kind="stable")[:count]] = True
    named = np.where(y == 1, shows < 1 - threshold, shows >= threshold)
    named |= flagged[:, None] & (evidence == strongest[:, None])
    return pd.DataFrame({"quality": expit(-strongest), "chance": chance, "flagged": flagged,
                         "missing": list(named & (y == 0)), "extra": list(named & (y == 1))})


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
    probs, votes = out_of_sample(params, layout, manifest)
    found = find_issues(y, probs, r.threshold, votes=votes)
    heldout = mean_ap(y, probs)
    names = np.array(labels, dtype=object)

    def words(mask):
        return " ".join(names[mask])
    rows = []
    for i in np.argsort(found["quality"].to_numpy(), kind="stable"):
        given, miss, extra = y[i].astype(bool), found["missing"][i], found["extra"][i]
        rows.append([manifest["source"][i], manifest["sha256"][i], words(given), words(miss), words(extra),
                     words((given | miss) & ~extra), float(f"{found['quality'][i]:.4g}"),
                     round(float(found["chance"][i]), 4), "yes" if found["flagged"][i] else "", ""])
    write_csv(out_csv, COLUMNS, rows, for_people=True)
    table = pd.DataFrame(rows, columns=COLUMNS)
    _contact_sheet(table, x, manifest, sheet, "", heldout)
    flagged = found["chance"].to_numpy(float)[found["flagged"].to_numpy(bool)]
    result = {"enabled": True, "images": len(rows), "flagged": len(flagged),
              "estimated_wrong": round(float(found["chance"].sum()), 1),
              # the share of the flagged images expected to hold a wrong label: the mean of their chances
              "expected_precision": round(float(flagged.mean()), 3) if len(flagged) else None,
              "folds": r.folds, "repeats": r.repeats,
              "heldout_map": round(heldout, 4) if heldout == heldout else None,
              "with_likely_missing": int(np.any(np.stack(found["missing"]), axis=1).sum()) if rows else 0,
              "with_likely_extra": int(np.any(np.stack(found["extra"]), axis=1).sum()) if rows else 0}
    write_json(summary, result)
    log.info("label review: %d of %d images flagged%s (%d folds x %d, %.0f s; the fold models' held-out mAP %.3f); "
             "worst first in %s", result["flagged"], len(rows), _expected(result), r.folds, r.repeats,
             time.time() - start, heldout, out_csv)
    if heldout < WEAK_MODELS:
        log.warning("label review: the fold models reach only %.2f held-out mAP, so the ranking mostly follows "
                    "the models' errors, not the labels' (%d flagged): use a stronger recipe (train.*, more "
                    "review.folds, review.epochs or review.time_budget_s) before acting on it", heldout,
                    result["flagged"])
    return result


def _expected(result: dict) -> str:
    """What the flags are expected to hold, for the log."""
    share = result["expected_precision"]
    return "" if share is None else f", about {share:.0%} of them expected to hold a wrong label"


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

