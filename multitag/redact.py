"""Keep credentials out of logs, Prefect logs and error messages: any environment value whose
name looks secret is replaced by *** wherever it would be written."""

from __future__ import annotations

import logging
import os
import re

_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSW|CREDENTIAL|ACCESS_KEY|API_KEY|PRIVATE", re.IGNORECASE)
MASK = "***"


def secret_values() -> list[str]:
    """Values of secret-looking environment variables, longest first (8+ characters, so that
    short common strings are not masked everywhere)."""
    return sorted({v for k, v in os.environ.items() if _SECRET_NAME.search(k) and len(v) >= 8}, key=len, reverse=True)


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
