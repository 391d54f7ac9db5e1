"""Pictures for the Prefect UI (tasks/pictures.py): small enough for an artifact page, and a plot that
cannot be drawn never fails a stage."""

import base64
import io

import numpy as np
from PIL import Image

from tasks.pictures import (MAX_BYTES, MAX_WIDTH, ap_per_label, batch_scores, drawn, model_history, picture,
                            small_png, training_curve)


def _decoded(markdown: str) -> Image.Image:
    data = markdown.split("data:image/png;base64,")[1].split(")")[0]
    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_a_large_photo_like_png_is_shrunk_for_the_ui(tmp_path):
    noise = np.random.default_rng(0).integers(0, 255, (1800, 2400, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "big.png")
    assert (tmp_path / "big.png").stat().st_size > 5 * MAX_BYTES
    small = small_png(tmp_path / "big.png")
    img = Image.open(io.BytesIO(small))
    assert len(small) <= MAX_BYTES and img.width <= MAX_WIDTH and img.format == "PNG"
    assert abs(img.width / img.height - 2400 / 1800) < 0.01  # shape kept


def test_plots_drawn_from_the_stage_tables(tmp_path):
    history = [{"epoch": str(e), "train_loss": str(1 / e), "val_map_raw": str(0.5 + e / 20), "val_map_ema": "",
                "lr": str(0.003 / e)} for e in range(1, 6)]
    assert _decoded(drawn(training_curve, history)).width > 500
    rows = [{"label": f"label {i}", "support": str(i), "ap": f"{i / 1000:.4f}" if i % 7 else ""} for i in range(1000)]
    img = _decoded(drawn(ap_per_label, rows))  # 1,000 labels: a curve and the 25 weakest by name
    assert img.height < 1000
    history = [{"version": v, "test mAP": m, "promoted": p, "champion mAP": c}
               for v, m, p, c in ((1, 0.5, True, 0.5), (2, 0.4, False, 0.5), (3, float("nan"), False, 0.5),
                                  (4, 0.7, True, 0.7))]
    assert _decoded(drawn(model_history, history)).width > 500
    checks = [{"batch": f"b{i}", "champion": "1", "batch_map": f"{0.9 - i / 10:.4f}" if i else "", "test_map": "0.9",
               "flagged": str(i > 2)} for i in range(5)]  # as batch_checks.csv has them; b0 not scored
    assert _decoded(drawn(batch_scores, checks)).width > 500


def test_a_plot_that_cannot_be_drawn_is_a_line_not_a_failure(tmp_path):
    assert drawn(training_curve, []) == "*(training curve: not drawn, no epoch was trained)*\n"
    assert "not drawn, no label has an AP" in drawn(ap_per_label, [{"label": "a", "support": "0", "ap": ""}])
    assert "not drawn, no version is registered" in drawn(model_history, [])
    assert "not drawn, no batch was scored" in drawn(batch_scores, [{"batch": "b0", "batch_map": ""}])
    assert "no picture" in picture(tmp_path / "missing.png", "label statistics")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    assert "no picture" in picture(tmp_path / "junk.png", "label statistics")
