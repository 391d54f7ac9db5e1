"""The ``multitag`` command: one sub-command per job. Stage commands are what dvc.yaml runs."""

from __future__ import annotations

import errno
import logging
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from multitag.config import ConfigError, load_params

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Multi-label image classification pipeline: ingest, labels, train, evaluate, register.")
log = logging.getLogger("multitag")

# Exit status of a stage that failed on transient I/O (EX_TEMPFAIL): the Prefect task retries those only.
EXIT_TRANSIENT = 75
_TRANSIENT_ERRNOS = {errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
                     errno.ECONNABORTED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EIO}


class Stage(str, Enum):
    ingest = "ingest"
    labels = "labels"
    train = "train"
    evaluate = "evaluate"
    register = "register"


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)


def is_transient(err: BaseException) -> bool:
    """Network and temporary I/O failures are worth a retry; bad data or code is not."""
    return isinstance(err, (ConnectionError, TimeoutError)) or (
        isinstance(err, OSError) and err.errno in _TRANSIENT_ERRNOS)


def _fail(err: BaseException) -> None:
    """Print a one-paragraph error (no traceback for expected failures) and exit."""
    log.error("%s", err)
    raise typer.Exit(EXIT_TRANSIENT if is_transient(err) else 1)


@app.command("sample-data")
def sample_data(
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: sample.out in params.yaml)")] = None,
    n_images: Annotated[Optional[int], typer.Option(help="Number of images (default: sample.n_images)")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed (default: sample.seed)")] = None,
    params: Annotated[Path, typer.Option(help="params.yaml to read")] = Path("params.yaml"),
):
    """Write the built-in sample data: scikit-learn's handwritten digits composed into multi-label images."""
    from multitag.config import SampleParams
    from multitag.sample_data import write_sample_data

    _setup_logging()
    try:
        p = load_params(params).sample if params.exists() else SampleParams()
        updates = {k: v for k, v in {"n_images": n_images, "seed": seed}.items() if v is not None}
        result = write_sample_data(p.model_copy(update=updates), out)
    except (ConfigError, OSError) as err:
        _fail(err)
    typer.echo(f"{result.images} images ({result.empty} without digits), annotations: {result.annotations}")


@app.command()
def stage(
    name: Annotated[Stage, typer.Argument(help="Stage to run (what dvc.yaml calls)")],
    params: Annotated[Path, typer.Option(help="params.yaml to read")] = Path("params.yaml"),
):
    """Run one pipeline stage in the current workspace, reading params.yaml."""
    _setup_logging()
    try:
        p = load_params(params)
        if name is Stage.ingest:
            from multitag.ingest import ingest
            ingest(p.ingest)
        elif name is Stage.labels:
            from multitag.labels import make_labels
            make_labels()
        elif name is Stage.train:
            from multitag.train import train
            train(p.train)
        elif name is Stage.evaluate:
            from multitag.evaluate import evaluate
            evaluate(p.evaluate)
        elif name is Stage.register:
            from multitag.register import register_model
            register_model(p)
    except (ConfigError, ValueError, KeyError, RuntimeError, OSError) as err:
        _fail(err)


@app.command()
def run(
    workdir: Annotated[Path, typer.Option(help="DVC workspace holding dvc.yaml and params.yaml")] = Path("."),
):
    """Run the whole training pipeline as a Prefect flow (each stage through DVC) and print a summary."""
    import time

    from flows.pipeline import summary_table, training_pipeline

    _setup_logging()
    start = time.time()
    try:
        load_params(workdir / "params.yaml")
    except ConfigError as err:
        _fail(err)
    summary = training_pipeline(workdir=str(workdir.resolve()))
    typer.echo(summary_table(summary, time.time() - start))


@app.command()
def predict(
    folder: Annotated[Path, typer.Argument(help="Folder of images (searched recursively)")],
    model: Annotated[str, typer.Option(help="Registry alias or version (champion, 3), or a model.pt file")] = "champion",
    out: Annotated[Path, typer.Option(help="CSV file to write")] = Path("predictions.csv"),
    thresholds: Annotated[Optional[Path], typer.Option(help="thresholds.json for a model.pt file (default 0.5)")] = None,
    params: Annotated[Path, typer.Option(help="params.yaml naming the store and the registered model")] = Path("params.yaml"),
):
    """Predict labels and per-label probabilities for every image in FOLDER."""
    from multitag.predict import predict_folder
    from multitag.storage import NotFound, open_store

    _setup_logging()
    try:
        p = load_params(params)
        result = predict_folder(folder, model, open_store(p.store.uri, params.parent), p.register.name, out,
                                str(thresholds) if thresholds else None)
    except (ConfigError, NotFound, ValueError, OSError) as err:
        _fail(err)
    typer.echo(f"{result['images']} images ({result['failed']} unreadable) scored with {result['model']}: {result['out']}")


if __name__ == "__main__":
    app()
