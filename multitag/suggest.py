"""What to annotate next: unlabelled images ranked by how much a label would help.

Each image is scored by the champion. A label is most informative where its probability sits at its
tuned threshold, so an image's uncertainty is the largest over labels of how close the probability
is to the threshold, on its side: ``1 - (t - p) / t`` below it, ``1 - (p - t) / (1 - t)`` above (1 on
the threshold, 0 at a certain 0 or 1). The top
``n`` are then picked greedily, each time the image with the highest uncertainty minus ``diversity``
times its largest similarity (cosine) to one already picked, over a small embedding of the image (an
8x8 thumbnail) and its probabilities: so the picks are not near-duplicates of each other.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from multitag.formats import UNFILLED
from multitag.report import contact_sheet, write_csv

log = logging.getLogger(__name__)


def uncertainty(probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """(images, labels) closeness of each probability to its label's threshold: 1 on it, 0 at 0 or 1."""
    below = (thresholds - probs) / np.maximum(thresholds, 1e-6)
    above = (probs - thresholds) / np.maximum(1 - thresholds, 1e-6)
    return 1 - np.where(probs < thresholds, below, above)


def embed(images: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Unit vectors from an 8x8 thumbnail (centred) and the probabilities, for diversity."""
    thumbs = np.stack([np.asarray(Image.fromarray(im).resize((8, 8), Image.BILINEAR), np.float32).ravel()
                       for im in images]) / 255
    vectors = np.hstack([thumbs - thumbs.mean(1, keepdims=True), probs])
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-8)


def pick(score: np.ndarray, vectors: np.ndarray, n: int, diversity: float) -> list[int]:
    """Greedy maximal marginal relevance: score minus ``diversity`` x the largest similarity to a pick."""
    chosen: list[int] = []
    closest = np.zeros(len(score))
    for _ in range(min(n, len(score))):
        gain = np.where(np.isin(np.arange(len(score)), chosen), -np.inf, score - diversity * closest)
        best = int(np.argmax(gain))
        chosen.append(best)
        closest = np.maximum(closest, vectors @ vectors[best])
    return chosen


def suggest(names: list[str], images: np.ndarray, probs: np.ndarray, thresholds: np.ndarray, labels: list[str],
            n: int, diversity: float = 0.5) -> pd.DataFrame:
    """The ``n`` images to annotate next, best first: rank, image, uncertainty, the most uncertain
    labels with their probabilities, the labels predicted now."""
    u = uncertainty(probs, thresholds)
    score = u.max(axis=1) if len(u) else np.zeros(0)
    order = pick(score, embed(images, probs), n, diversity)
    rows = []
    for rank, i in enumerate(order, 1):
        top = np.argsort(-u[i])[:3]
        rows.append({"rank": rank, "image": names[i], "uncertainty": round(float(score[i]), 4),
                     "uncertain_labels": " ".join(f"{labels[j]}:{probs[i, j]:.2f}" for j in top),
                     "predicted": " ".join(np.array(labels, object)[probs[i] >= thresholds])})
    return pd.DataFrame(rows, columns=["rank", "image", "uncertainty", "uncertain_labels", "predicted"])


def write_suggestions(table: pd.DataFrame, images: dict[str, np.ndarray], out: Path) -> None:
    """suggestions.csv and a contact sheet, suggestions.png, in ``out``."""
    write_csv(out / "suggestions.csv", list(table.columns), table.itertuples(index=False), for_people=True)
    shown = table.head(30)
    contact_sheet([images[row.image] for row in shown.itertuples()],
                  [f"#{row.rank} {row.image[:20]}\n{row.uncertain_labels[:34]}" for row in shown.itertuples()],
                  out / "suggestions.png", "annotate next: most informative first, near-duplicates kept apart")


def write_batch_skeleton(table: pd.DataFrame, read, dest: Path) -> Path:
    """The chosen images and a labels.csv whose tag cells hold ``?`` until a person writes the labels:
    then it is ready for `multitag inbox add`, which rejects the rows still holding ``?`` (an image
    nobody annotated must not enter training as one with no labels)."""
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest} is not empty: choose a new folder for the batch")
    files: dict[str, str] = {}  # file in the batch -> image; sub/a.jpg becomes sub__a.jpg
    for name in table["image"]:
        file = name.replace("/", "__")
        if file in files:
            raise ValueError(f"{files[file]} and {name} would both be images/{file} in the batch: rename one of them")
        files[file] = name
    (dest / "images").mkdir(parents=True, exist_ok=True)
    for file, name in files.items():
        (dest / "images" / file).write_bytes(read(name))
    return write_csv(dest / "labels.csv", ["image_name", "tags"], ((file, UNFILLED) for file in files))


def suggest_folder(source: str, n: int, model: str, registry, out: Path, batch: Path | None = None,
                   diversity: float = 0.5) -> dict:
    """Rank the images of ``source`` (a folder, searched recursively, or an s3:// prefix) with
    ``model`` (a registry reference or a model file), write the top ``n`` to ``out`` (suggestions.csv
    and suggestions.png) and, with ``batch``, the chosen images as an inbox batch to fill in. Returns
    the table, the number of images read, the unreadable ones (name -> why), the model's description
    and the batch's labels.csv (or None)."""
    import tempfile

    from multitag.dataset import select_device
    from multitag.predict import ImageSource, decode_batch, open_model

    if n < 1:
        raise ValueError("--n must be at least 1")
    images = ImageSource(source)
    if not images.names:
        raise FileNotFoundError(f"no image files in {source}")
    with tempfile.TemporaryDirectory() as tmp:
        predictor, desc, _ = open_model(model, registry, None, "torch", Path(tmp), select_device("auto"))
        names, arrays, errors = decode_batch(images, images.names, predictor.image_size)
    if not names:
        raise ValueError(f"none of the {len(errors)} image files in {source} could be read; first: "
                         f"{next(iter(errors.items()))}")
    pixels = np.stack(arrays)
    table = suggest(names, pixels, predictor.scores(pixels), predictor.thresholds, predictor.labels, n, diversity)
    skeleton = write_batch_skeleton(table, images.read, batch) if batch else None  # first: it may refuse
    out.mkdir(parents=True, exist_ok=True)
    write_suggestions(table, dict(zip(names, pixels)), out)
    return {"table": table, "images": len(names), "errors": errors, "model": desc, "batch": skeleton}
