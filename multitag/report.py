"""Small writers every stage shares: files written whole or not at all, JSON and CSV reports, and
markdown tables for model cards and Prefect artifacts."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Sequence


def utc_now() -> str:
    """The time written into ledgers and reports: UTC, to the second, ISO 8601."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Write ``path`` whole or not at all: a temporary file beside it, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_json(path: str | Path, obj) -> Path:
    return write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


# A cell starting with one of these is a formula to a spreadsheet (OWASP "CSV injection"): a label
# such as =HYPERLINK(...) or an image named +1.png would run when the file is opened.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def as_text_cell(value):
    """A cell a spreadsheet shows as text: a ' before a leading = + - @ tab or CR (the spreadsheet
    hides it; ``text_of_cell`` takes it off again)."""
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_START) else value


def text_of_cell(value: str) -> str:
    return value[1:] if value.startswith("'") and value[1:].startswith(FORMULA_START) else value


def read_csv_rows(path: str | Path) -> list[dict]:
    """A CSV's rows as dicts, each cell as written before ``write_csv(for_people=True)`` guarded it (or
    as a spreadsheet saved it); a byte-order mark (a spreadsheet's "CSV UTF-8") is not part of the header."""
    try:
        with Path(path).open(newline="", encoding="utf-8-sig") as f:
            return [{k: text_of_cell(v) if isinstance(v, str) else v for k, v in row.items()}
                    for row in csv.DictReader(f)]
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason}); re-save the file as UTF-8") from None


def write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence], for_people: bool = False) -> Path:
    """A CSV written whole. ``for_people``: a file people open in a spreadsheet, whose text cells that
    would be formulas are written as text (``as_text_cell``); read it back with ``read_csv_rows``."""
    text = io.StringIO()
    w = csv.writer(text, lineterminator="\n")
    w.writerow(header)
    w.writerows(([as_text_cell(c) for c in row] for row in rows) if for_people else rows)
    return write_atomic(path, text.getvalue())


def replace_dir(tmp: Path, final: Path) -> None:
    """Put a fully written folder ``tmp`` in place of ``final``."""
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def _cell(v) -> str:
    if isinstance(v, float):
        return "" if v != v else f"{v:.4f}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Sequence], header: Sequence[str] | None = None) -> str:
    """A markdown table; without ``header``, a two-column key/value table."""
    header = header or ("", "")
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def contact_sheet(images: Sequence, titles: Sequence[str], path: Path, title: str, colors: Sequence[str] | None = None,
                  message: str = "no images", cols: int = 6) -> None:
    """A PNG grid of ``images`` (HxWx3 uint8), each under its title (up to three short lines), or
    ``message`` when there are none. Constrained layout keeps every title clear of the row above."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, -(-len(images) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 3.0 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for i, (ax, image, text) in enumerate(zip(axes.flat, images, titles)):
        ax.imshow(image)
        ax.set_title(text, fontsize=7, color=colors[i] if colors else "black")
    if not len(images):
        axes.flat[0].text(0, 0.5, message, fontsize=11)
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
