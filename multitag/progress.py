"""Progress for long loops: a tqdm bar on a terminal, periodic log lines otherwise (e.g. when the
stage runs under DVC inside a Prefect task, whose log shows those lines)."""

from __future__ import annotations

import logging
import sys
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], total: int, desc: str, unit: str, log: logging.Logger,
             every: float = 0.1) -> Iterator[T]:
    if sys.stderr.isatty():
        yield from tqdm(items, total=total, desc=desc, unit=unit, mininterval=1.0, leave=False)
        return
    step = max(1, int(total * every))
    for i, item in enumerate(items, 1):
        yield item
        if i % step == 0 or i == total:
            log.info("%s: %d/%d %s", desc, i, total, unit)
