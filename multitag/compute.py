"""Which engine runs the image work of ingest and batch prediction, chosen by ``compute.dask``:

- ``null`` (the default): this machine, a local process pool;
- ``local:N``: a Dask ``LocalCluster`` of N worker processes on this machine;
- ``tcp://scheduler:8786``: an existing Dask cluster. Its workers read the images themselves (from a
  path they share with this machine, or from S3 with their own credentials), so only the small decoded
  uint8 arrays travel back.

The same functions run either way, in chunks of ``compute.chunk`` images (a task of a few hundred
images keeps Dask's per-task overhead small). On a cluster, what can go wrong past one machine is
told apart (``_on_dask``): workers that run other versions are refused at connect; the work's own
error on a worker is said as the workers' (their paths, their credentials) and not retried; a lost
scheduler, or no worker for ``compute.worker_wait_s``, ends the run with one paragraph. Dask comes
with the ``scale`` extra (``pip install 'multitag[scale]'``; ``make setup`` installs it).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from functools import cache
from pathlib import Path
from typing import Callable, Iterator

from multitag.config import ComputeParams
from multitag.errors import ClusterError, ComputeError, ConfigError, is_transient

log = logging.getLogger(__name__)

POLL_S = 2.0  # how often a wait for a task's result looks at the cluster's workers


def _client(spec: str):
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise ConfigError(f"compute.dask: {spec!r} needs Dask: install the scale extra, "
                          "pip install 'multitag[scale]' (make setup installs it)") from None
    if spec.startswith("local:"):
        # its scheduler runs in this process: no INFO line per worker, connection and key (Dask sets its
        # loggers' levels when first imported, after multitag's logging setup)
        logging.getLogger("distributed").setLevel(logging.WARNING)
        cluster = LocalCluster(n_workers=int(spec.removeprefix("local:")), threads_per_worker=1, processes=True,
                               dashboard_address=None)
        return Client(cluster), cluster
    try:
        return Client(spec, timeout=10), None
    except (OSError, TimeoutError) as err:
        raise ComputeError(f"compute.dask: cannot reach the Dask scheduler at {spec} ({err}); check that "
                           "`dask scheduler` runs there, that the address and port are right, and that this "
                           "machine can reach it") from None


def code_digest(package: Path | None = None) -> str:
    """sha256 (12 hex digits) of multitag's .py files in ``package`` (default: the one imported)."""
    import multitag
    code = hashlib.sha256()
    for path in sorted((package or Path(multitag.__file__).parent).glob("*.py")):
        code.update(path.name.encode() + path.read_bytes())
    return code.hexdigest()[:12]


@cache
def versions() -> dict[str, str]:
    """What must be the same on this machine and every worker for their results to equal: Python,
    multitag (its version and a digest of its code: two checkouts of one version differ) and the
    libraries that decode and score images."""
    import numpy
    import PIL
    import torch

    import multitag
    return {"python": sys.version.split()[0], "multitag": f"{multitag.__version__} (code {code_digest()})",
            "torch": torch.__version__, "Pillow": PIL.__version__, "numpy": numpy.__version__}


def check_versions(client, where: str) -> None:
    """Refuse a cluster whose workers run other versions than this machine (ClusterError naming
    each difference): Dask's own packages, then multitag and its image libraries."""
    try:
        client.get_versions(check=True)
    except ValueError as err:
        raise ClusterError(f"the Dask cluster at {where} runs other versions of Dask's packages than this "
                           f"machine: {err}") from None
    here = versions()
    differ = [f"{worker}: {name} {theirs.get(name)} (here {mine})"
              for worker, theirs in sorted(client.run(versions).items())
              for name, mine in here.items() if theirs.get(name) != mine]
    if differ:
        raise ClusterError(f"the Dask cluster at {where} runs other versions than this machine, so its results "
                           f"would differ: {'; '.join(differ)}; install the same multitag and libraries on "
                           "every worker (the image built from infra/Dockerfile) and restart them")


@contextlib.contextmanager
def executor(p: ComputeParams, local_workers: int = 0) -> Iterator:
    """Where image work runs: a process pool, a Dask ``Client``, or None for this process
    (``local_workers`` 1)."""
    if p.dask is None:
        workers = local_workers or os.cpu_count() or 1
        if workers == 1:
            yield None
            return
        with ProcessPoolExecutor(workers) as pool:
            yield pool
        return
    client, cluster = _client(p.dask)
    quiet = logging.getLogger("distributed.client")  # it prints a lost scheduler's tracebacks; ComputeError
    level = quiet.level                              # says it in one paragraph
    quiet.setLevel(logging.CRITICAL)
    try:
        try:
            check_versions(client, p.dask)
        except OSError as err:  # the scheduler went away in the meantime
            raise _lost(p.dask, err) from None
        log.info("work on the Dask cluster at %s (%d workers)", client.scheduler.address,
                 len(client.nthreads()))
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
        quiet.setLevel(level)


def map_chunks(fn: Callable, items: list, pool, chunk: int, compute: ComputeParams) -> Iterator:
    """fn(chunk of items) for consecutive chunks, results in order; on the pool (a process pool or a
    Dask Client) when given. Nothing half-done is kept by the callers when this raises."""
    chunks = [items[i:i + chunk] for i in range(0, len(items), chunk)]
    if pool is None:
        yield from map(fn, chunks)
    elif isinstance(pool, Executor):
        yield from pool.map(fn, chunks)
    else:
        yield from _on_dask(pool, fn, chunks, compute)


def _on_dask(client, fn: Callable, chunks: list, compute: ComputeParams) -> Iterator:
    """The chunks' results from the Dask cluster, in order. What can go wrong is told apart:
    the work's own error on a worker (ClusterError or, if worth a retry, ComputeError, naming the
    workers); the scheduler lost (ComputeError); no worker connected for ``compute.worker_wait_s``
    (ComputeError; Dask itself would wait forever)."""
    where = compute.dask
    futures = client.map(fn, chunks, pure=False)
    try:
        for future in futures:
            alone_since = None
            while not _done(future):
                if client.status != "running":
                    break
                if client.nthreads():
                    alone_since = None
                    continue
                alone_since = alone_since or time.monotonic()
                if time.monotonic() - alone_since > compute.worker_wait_s:
                    raise ComputeError(f"no Dask worker has been connected to the scheduler at {where} for "
                                       f"{compute.worker_wait_s:g} s (compute.worker_wait_s); start workers "
                                       f"(dask worker {where}) and run again")
            if future.status == "error":
                raise _task_error(future.exception(), where)
            yield future.result()
    except (ComputeError, ClusterError):
        raise
    except Exception as err:  # the scheduler or the connection to it lost
        raise _lost(where, err) from None
    finally:
        with contextlib.suppress(Exception):  # nothing to cancel on a scheduler that is gone
            client.cancel(futures)


def _lost(where: str, err: BaseException) -> ComputeError:
    return ComputeError(f"the Dask cluster at {where} went away midway ({type(err).__name__}: {err}); check the "
                        "scheduler and its workers, then run again (finished work is not kept)")


def _done(future) -> bool:
    """Whether ``future`` finished within POLL_S seconds."""
    from distributed import wait
    try:
        wait([future], timeout=POLL_S)
    except TimeoutError:
        return False
    return True


def _task_error(err: BaseException, where: str) -> Exception:
    """The error a chunk of work raised on a worker, said as the workers': their files, their
    credentials and their network are not this machine's."""
    text = f"{type(err).__name__}: {err}"
    if "credentials" in str(err):
        text += ("; the workers need their own AWS credentials (this machine's are not sent to them): set "
                 "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or a role) where each `dask worker` runs")
    elif isinstance(err, FileNotFoundError):
        text += ("; the workers must see the images at the same path as this machine (a shared file system), "
                 "or read them from S3")
    message = f"on the workers of the Dask cluster at {where}: {text}"
    return ComputeError(message) if is_transient(err) else ClusterError(message)
