"""What multitag writes to logs: secrets masked, and no traceback for errors a user can act on.

Secrets: the value of every set credential variable of AWS and Prefect (``CREDENTIALS``), whatever
its length, and of any other variable whose name looks secret (``*SECRET*``, ``*TOKEN*``,
``*PASSW*``, ...) when it is 8 characters or longer (shorter values such as ``1`` or ``true`` would
mask ordinary text everywhere) is replaced by ``***`` in every log line the CLI, the stages and the
Prefect tasks write, and in the DVC output streamed into Prefect's log.
"""

from __future__ import annotations

import logging
import os
import re
import sys

from multitag.errors import USER_ERRORS

_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSW|CREDENTIAL|ACCESS_KEY|API_KEY|PRIVATE", re.IGNORECASE)
CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
               "PREFECT_API_KEY", "PREFECT_API_AUTH_STRING", "PREFECT_SERVER_API_AUTH_STRING")
MASK = "***"


def secret_values() -> list[str]:
    """The values to mask, longest first."""
    values = {v for k, v in os.environ.items()
              if v and (k in CREDENTIALS or (_SECRET_NAME.search(k) and len(v) >= 8))}
    return sorted(values, key=len, reverse=True)


def redact(text: str) -> str:
    for value in secret_values():
        text = text.replace(value, MASK)
    return text


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


class NoUserErrorTraceback(logging.Filter):
    """An error the user can act on (bad input, a failed stage, an unreachable store) is logged as its
    message alone: its traceback says nothing more to them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], USER_ERRORS):
            record.exc_info, record.exc_text = None, None
        return True


class SaidOnce(logging.Filter):
    """On a terminal: Prefect's lines about a task or flow that ended on a failed stage (the task's and
    the flow's final states, the flow's exception) repeat the one paragraph the CLI prints last, so
    the terminal shows the error once, not four times. The Prefect UI keeps them (this filter is on
    the console handlers only)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith("prefect.") and
                    any(name in record.getMessage() for name in ("StageFailed", "TransientStageError")))


def setup_logging() -> None:
    """Timestamped lines on stderr, secrets masked; no line per HTTP request."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    install_filters()
    # a line per Prefect API request, per S3 client otherwise
    for noisy in ("httpx", "botocore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def install_filters() -> None:
    """Add the filters to every handler of the root logger and of Prefect's run loggers (call again
    after importing Prefect, which installs its own handlers)."""
    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs"):
        for handler in logging.getLogger(name).handlers:
            console = type(handler) is logging.StreamHandler or type(handler).__name__ == "PrefectConsoleHandler"
            for f in (RedactingFilter, NoUserErrorTraceback, *([SaidOnce] if console else [])):
                if not any(isinstance(x, f) for x in handler.filters):
                    handler.addFilter(f())
