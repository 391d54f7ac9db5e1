"""The raw data retraining grows (``retrain.raw``, versioned with ``dvc add``): append-only, one
ledger entry per batch taken in from the inbox.

- ``images/<sha256><ext>``: every accepted image once, named by its content;
- ``batches.json``: the ledger, one entry per applied batch with its rows (image -> labels). It is
  written atomically and is the commit point: a batch in the ledger is never applied again;
- ``annotations.jsonl``: what ingest reads, derived from the ledger (a later batch's labels for a
  known image replace the earlier ones).

The first batch, ``origin``, is the data set params.yaml's ingest pointed at when retraining began
(multitag/lineage.py says which data set ingest reads).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from multitag.images import IMAGE_SUFFIXES
from multitag.layout import LEDGER, RAW_ANNOTATIONS, RAW_IMAGES
from multitag.report import read_json, utc_now, write_atomic, write_json

log = logging.getLogger(__name__)


class RawData:
    """The append-only raw data folder (see the module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def ledger(self) -> list[dict]:
        path = self.root / LEDGER
        return read_json(path) if path.exists() else []

    @staticmethod
    def fold(ledger: list[dict]) -> dict[str, dict]:
        """Content hash -> {"image", "labels"}: the current labels of every image."""
        rows: dict[str, dict] = {}
        for entry in ledger:
            rows.update(entry["rows"])
        return rows

    def write_annotations(self, ledger: list[dict]) -> None:
        write_atomic(self.root / RAW_ANNOTATIONS, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                      for r in self.fold(ledger).values()))

    def apply(self, name: str, fingerprint: str, content, source: str) -> dict:
        """Append a validated batch (``content``: a BatchContent): copy its new images, then commit its
        ledger entry. Returns the entry."""
        ledger = self.ledger()
        current = self.fold(ledger)
        known_labels = {t for r in current.values() for t in r["labels"]}
        rows: dict[str, dict] = {}
        added, duplicates, relabelled = 0, 0, []
        for image, digest, tags in content.images:
            ext = Path(image).suffix.lower()
            row = {"image": f"{digest}{ext if ext in IMAGE_SUFFIXES else ''}", "labels": list(tags)}
            before = rows.get(digest) or current.get(digest)
            if before is None:
                added += 1
            elif before["labels"] != row["labels"]:
                relabelled.append({"image": image, "before": before["labels"], "after": row["labels"]})
                row["image"] = before["image"]
            else:
                duplicates += 1
                continue
            dest = self.root / RAW_IMAGES / row["image"]
            if not dest.exists():
                write_atomic(dest, content.read(image))
            rows[digest] = row
        entry = {"batch": name, "fingerprint": fingerprint, "source": source, "applied": utc_now(),
                 "records": content.records, "added": added, "relabelled": relabelled, "duplicates": duplicates,
                 "rejected": content.rejected,
                 "new_labels": sorted({t for r in rows.values() for t in r["labels"]} - known_labels),
                 "rows": rows}
        ledger.append(entry)
        write_json(self.root / LEDGER, ledger)
        self.write_annotations(ledger)
        log.info("batch %s: %d new image(s), %d relabelled, %d duplicate(s), %d record(s) rejected",
                 name, added, len(relabelled), duplicates, len(content.rejected))
        return entry


def summary(entry: dict) -> dict:
    """A ledger entry without its rows (for reports)."""
    return {k: v for k, v in entry.items() if k != "rows"}
