"""The errors a user can cause or meet, and the exit status each maps to.

Every stage, the CLI and the Prefect tasks import from here, so the meaning of an exit status is
defined once: 1 for bad input or configuration (retrying would fail again), ``EXIT_TRANSIENT``
(EX_TEMPFAIL, 75) for transient I/O (the Prefect tasks retry only those), ``EXIT_INTERRUPTED``
(130, as shells report Ctrl-C) for a run stopped by the user.
"""

from __future__ import annotations

import errno

EXIT_FAILED = 1
EXIT_TRANSIENT = 75
EXIT_INTERRUPTED = 130

_TRANSIENT_ERRNOS = {errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
                     errno.ECONNABORTED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EIO}


class ConfigError(ValueError):
    """params.yaml (or the lineage file) is missing, unreadable or invalid; the message names the key."""


class IngestError(RuntimeError):
    """The annotations as a whole are unusable; the message says what to fix."""


class RecordError(ValueError):
    """One record (row, file) is unusable; the message says why in plain words."""


class LineageError(RuntimeError):
    """The workspace's data, registry and lineage disagree; the message says what to do."""


class PreconditionFailed(Exception):
    """A conditional write lost: the key exists (if_none_match) or changed (if_match)."""


class NotFound(LookupError):
    """A store key, registered version or alias does not exist."""


class StoreError(RuntimeError):
    """A store operation failed; the message names the operation, the location and what to check."""


class StoreUnavailable(StoreError, ConnectionError):
    """The store could not be reached (endpoint down, timeouts, throttling): worth a retry."""


class BatchRejected(IngestError):
    """An inbox batch as a whole is unusable; ``rejected`` lists its records' problems, if any."""

    def __init__(self, reason: str, rejected: list[dict] | None = None):
        super().__init__(reason)
        self.rejected = rejected or []


class ComputeError(RuntimeError, ConnectionError):
    """The Dask cluster is unreachable or went away: worth a retry once it is back."""


class ClusterError(RuntimeError):
    """The Dask cluster is up but cannot do this work as it is (workers that run other versions, or
    lack the files or credentials the work needs): retrying would fail again."""


class StageFailed(RuntimeError):
    """A pipeline stage failed on bad input or a bug: retrying would fail again."""


class TransientStageError(StageFailed):
    """A stage failed on transient I/O (its command exited with EXIT_TRANSIENT): worth a retry."""


# Errors a user can act on: logged as their message alone, never with a traceback.
USER_ERRORS = (ConfigError, IngestError, RecordError, LineageError, NotFound, StoreError, StageFailed, ComputeError,
               ClusterError)
# What the CLI reports in one paragraph (no traceback); anything else is a bug and keeps its traceback.
EXPECTED = (ConfigError, IngestError, RecordError, LineageError, NotFound, StoreError, StageFailed,
            ValueError, LookupError, RuntimeError, OSError)


def is_transient(err: BaseException) -> bool:
    """Network and temporary I/O failures are worth a retry; bad data or code is not."""
    return isinstance(err, (ConnectionError, TimeoutError, TransientStageError)) or (
        isinstance(err, OSError) and err.errno in _TRANSIENT_ERRNOS)


def exit_code(err: BaseException) -> int:
    if isinstance(err, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_TRANSIENT if is_transient(err) else EXIT_FAILED
