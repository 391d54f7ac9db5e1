"""Pictures for the Prefect UI: the plots a stage drew (PNG files, also DVC plots), and the ones drawn
here from its tables (the training curve, AP per label), embedded in markdown artifacts as data
URIs: the Prefect UI shows such an image on the artifact page (checked with the pinned Prefect 3
server and headless Chromium, tests/test_retrain_server.py).

Each image is made small enough for the UI: at most ``MAX_WIDTH`` px wide, quantised to 256 colours
(plots have few) and optimised, and halved until it fits ``MAX_BYTES``. Every picture is stored in
Prefect's database with its run, and an artifact page loads all of its pictures at once: 600 KB
(about 800 KB as base64) keeps a page of several plots quick, where the 1.4 MB a PNG can take
still renders but slowly. A plot that cannot be drawn (nothing to plot, a file missing) is left out
with a line saying so: pictures never fail a stage.
"""

from __future__ import annotations

import base64
import io
import logging
import tempfile
from pathlib import Path

from PIL import Image

log = logging.getLogger(__name__)

MAX_WIDTH = 1200
MAX_BYTES = 600_000


def small_png(path: Path) -> bytes:
    """The PNG at ``path``, made small enough for the UI (module docstring)."""
    with Image.open(path) as img:
        img = img.convert("RGB")
    if img.width > MAX_WIDTH:
        img = img.resize((MAX_WIDTH, round(img.height * MAX_WIDTH / img.width)), Image.LANCZOS)
    while True:
        buffer = io.BytesIO()
        img.quantize(256).save(buffer, "PNG", optimize=True)
        if buffer.tell() <= MAX_BYTES or img.width < 200:
            return buffer.getvalue()
        img = img.resize((img.width // 2, img.height // 2), Image.LANCZOS)


def picture(path: Path, alt: str) -> str:
    """Markdown showing the PNG at ``path``, or a line saying why there is none."""
    try:
        data = base64.b64encode(small_png(path)).decode()
    except (OSError, ValueError) as err:
        log.warning("no picture of %s for the UI: %s", alt, err)
        return f"*({alt}: no picture, {err})*\n"
    return f"![{alt}](data:image/png;base64,{data})\n"


def drawn(draw, *args) -> str:
    """Markdown of a picture ``draw(*args, png)`` draws into a temporary file (drawn for the UI
    only), or a line saying why it could not be drawn."""
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "plot.png"
        try:
            draw(*args, png)
        except (ValueError, KeyError, IndexError, OSError) as err:
            log.warning("%s: not drawn for the UI: %s", draw.__name__, err)
            return f"*({draw.__name__.replace('_', ' ')}: not drawn, {err})*\n"
        return picture(png, draw.__name__.replace("_", " "))


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def training_curve(history: list[dict], png: Path) -> None:
    """Loss, validation mAP (raw and EMA weights) and learning rate per epoch."""
    if not history:
        raise ValueError("no epoch was trained")
    plt = _pyplot()
    epochs = [int(h["epoch"]) for h in history]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(13, 3.4), layout="constrained")
    ax1.plot(epochs, [float(h["train_loss"]) for h in history], marker=".")
    ax1.set(title="training loss", xlabel="epoch")
    for key, name in (("val_map_raw", "raw weights"), ("val_map_ema", "EMA weights")):
        values = [float(h[key]) if h.get(key) not in ("", None) else None for h in history]
        if any(v is not None for v in values):
            ax2.plot(epochs, [float("nan") if v is None else v for v in values], marker=".", label=name)
    ax2.set(title="validation mAP", xlabel="epoch")
    ax2.legend(fontsize=8)
    ax3.plot(epochs, [float(h["lr"]) for h in history], marker=".")
    ax3.set(title="learning rate (end of epoch)", xlabel="epoch")
    fig.savefig(png, dpi=80)
    plt.close(fig)


def ap_per_label(rows: list[dict], png: Path, weakest: int = 25) -> None:
    """AP of every label, sorted (a curve: readable at 1,000 labels), and the ``weakest`` labels by
    name with their test support."""
    scored = sorted(((float(r["ap"]), r["label"], r.get("support", "")) for r in rows if r.get("ap") not in ("", None)),
                    key=lambda t: t[0])
    if not scored:
        raise ValueError("no label has an AP (no positives in the test split)")
    plt = _pyplot()
    shown = scored[:weakest]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, max(3.4, 0.22 * len(shown) + 1)), layout="constrained")
    ax1.plot(range(1, len(scored) + 1), [s[0] for s in scored])
    ax1.set(title=f"AP of the {len(scored)} labels, lowest first", xlabel="labels (sorted)", ylabel="AP",
            ylim=(0, 1.02))
    ax2.barh([f"{label} ({support})" for _, label, support in shown], [s[0] for s in shown])
    ax2.invert_yaxis()
    ax2.set(title=f"the {len(shown)} weakest labels (test support)", xlim=(0, 1), xlabel="AP")
    ax2.tick_params(axis="y", labelsize=7)
    fig.savefig(png, dpi=80)
    plt.close(fig)


def model_history(rows: list[dict], png: Path) -> None:
    """Test mAP of every registered version (filled: it became the champion) and the champion's test
    mAP after each registration (a step line)."""
    if not rows:
        raise ValueError("no version is registered")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.6), layout="constrained")
    versions = [r["version"] for r in rows]
    for promoted, style in ((True, {"color": "C0"}), (False, {"facecolors": "none", "edgecolors": "C0"})):
        shown = [r for r in rows if r["promoted"] == promoted and r["test mAP"] is not None]
        ax.scatter([r["version"] for r in shown], [r["test mAP"] for r in shown], zorder=3,
                   label="became the champion" if promoted else "not promoted", **style)
    ax.step(versions, [r["champion mAP"] for r in rows], where="post", color="C1", label="champion")
    ax.set(title="registered versions: test mAP", xlabel="version", ylabel="test mAP")
    ax.set_xticks(versions if len(versions) <= 30 else versions[::max(1, len(versions) // 30)])
    ax.legend(fontsize=8)
    fig.savefig(png, dpi=80)
    plt.close(fig)


def batch_scores(rows: list[dict], png: Path) -> None:
    """The champion on each new batch, in the order checked (batch_checks.csv): its mAP on the
    batch against its own test mAP; flagged batches in red."""
    checked = [r for r in rows if r.get("batch_map") not in ("", None)]
    if not checked:
        raise ValueError("no batch was scored (no champion yet, or no new images)")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.6), layout="constrained")
    x = range(len(checked))
    ax.plot(x, [float(r["test_map"]) for r in checked], color="C1", label="champion's test mAP")
    ax.plot(x, [float(r["batch_map"]) for r in checked], marker="o", color="C0", label="mAP on the batch")
    flagged = [i for i, r in enumerate(checked) if r["flagged"] in ("True", "true", True)]
    ax.scatter(flagged, [float(checked[i]["batch_map"]) for i in flagged], color="red", zorder=3, label="flagged")
    ax.set_xticks(list(x), [f"{r['batch']}\nv{r['champion']}" for r in checked], fontsize=7,
                  rotation=30 if len(checked) > 8 else 0)
    ax.set(title="the champion on each new batch", ylabel="mAP")
    ax.legend(fontsize=8)
    fig.savefig(png, dpi=80)
    plt.close(fig)


def tune_history(trials: list[dict], png: Path) -> None:
    """Optuna's optimisation history: each trial's validation mAP in the order run (pruned trials at
    the best they reached, hollow), and the best so far."""
    scored = [t for t in trials if t["state"] == "complete" or (t["state"] == "pruned" and t["last_val_map"] is not None)]
    if not scored:
        raise ValueError("no trial has a validation mAP yet")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.6), layout="constrained")
    for state, style in (("complete", {"color": "C0"}), ("pruned", {"facecolors": "none", "edgecolors": "C0"})):
        shown = [t for t in scored if t["state"] == state]
        ax.scatter([t["number"] for t in shown], [t["val_map"] if state == "complete" else t["last_val_map"]
                                                  for t in shown], zorder=3, label=state, **style)
    best, line = float("-inf"), []
    for t in scored:
        best = max(best, t["val_map"]) if t["state"] == "complete" else best
        line.append(best if best > float("-inf") else float("nan"))
    ax.step([t["number"] for t in scored], line, where="post", color="C1", label="best so far")
    ax.set(title="tune: validation mAP of each trial", xlabel="trial", ylabel="val mAP")
    ax.legend(fontsize=8)
    fig.savefig(png, dpi=80)
    plt.close(fig)
