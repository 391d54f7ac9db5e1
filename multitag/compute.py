"""Which engine runs the image work of ingest and batch prediction, chosen by ``compute.dask``:

- ``null`` (the default): this machine, a local process pool;
- ``local:N``: a Dask ``LocalCluster`` of N worker processes on this machine;
- ``tcp://scheduler:8786``: an existing Dask cluster. Its workers read the images themselves (from a
  path they share with this machine, or from S3 with their own credentials), so only the small decoded
  uint8 arrays travel back.

Both speak ``concurrent.futures.Executor`` (``distributed.Client.get_executor()`` on a cluster), so
the same functions run either way, in chunks of ``compute.chunk`` images (a task of a few hundred
images keeps Dask's per-task overhead small). Dask comes with the ``scale`` extra
(``pip install 'multitag[scale]'``; ``make setup`` installs it).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator

from multitag.config import ComputeParams
from multitag.errors import ComputeError, ConfigError

log = logging.getLogger(__name__)


def _client(spec: str):
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise ConfigError(f"compute.dask: {spec!r} needs Dask: install the scale extra, "
                          "pip install 'multitag[scale]' (make setup installs it)") from None
    if spec.startswith("local:"):
        cluster = LocalCluster(n_workers=int(spec.removeprefix("local:")), threads_per_worker=1, processes=True,
                               dashboard_address=None)
        return Client(cluster), cluster
    try:
        return Client(spec, timeout=10), None
    except (OSError, TimeoutError) as err:
        raise ComputeError(f"compute.dask: cannot reach the Dask scheduler at {spec} ({err}); check that "
                           "`dask scheduler` runs there, that the address and port are right, and that this "
                           "machine can reach it") from None


@contextmanager
def executor(p: ComputeParams, local_workers: int = 0) -> Iterator[Executor | None]:
    """The executor for image work, or None to do it in this process (``local_workers`` 1)."""
    if p.dask is None:
        workers = local_workers or os.cpu_count() or 1
        if workers == 1:
            yield None
            return
        with ProcessPoolExecutor(workers) as pool:
            yield pool
        return
    client, cluster = _client(p.dask)
    log.info("image work on the Dask cluster at %s (%d workers)", client.scheduler.address,
             len(client.scheduler_info()["workers"]))
    try:
        yield client.get_executor()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def map_chunks(fn: Callable, items: list, pool: Executor | None, chunk: int, where: str) -> Iterator:
    """fn(chunk of items) for consecutive chunks, results in order; on the pool when given. A cluster
    that goes away midway is a ComputeError naming it (nothing half-written is kept by the callers)."""
    chunks = [items[i:i + chunk] for i in range(0, len(items), chunk)]  # a list: Dask maps no iterators
    if pool is None:
        yield from map(fn, chunks)
        return
    try:
        yield from pool.map(fn, chunks)
    except (OSError, TimeoutError) as err:
        raise ComputeError(f"the Dask cluster at {where} went away midway ({type(err).__name__}: {err}); check the "
                           "scheduler and its workers, then run again (finished work is not kept)") from None
    except Exception as err:  # distributed's own errors (a lost scheduler, too many worker deaths)
        if type(err).__module__.startswith("distributed"):
            raise ComputeError(f"the Dask cluster at {where} failed: {type(err).__name__}: {err}") from None
        raise
