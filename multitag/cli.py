"""The ``multitag`` command: one sub-command per job. Stage commands are what dvc.yaml runs."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from multitag.config import load_params
from multitag.errors import EXIT_INTERRUPTED, EXPECTED, exit_code
from multitag.layout import PIPELINE, STAGE_MODULES, Layout
from multitag.telemetry import quiet_env, silence

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Multi-label image classification pipeline: ingest, labels, train, evaluate, register.")
log = logging.getLogger("multitag")

ParamsOption = Annotated[Path, typer.Option(help="params.yaml naming the store and the registered model")]
Stage = Enum("Stage", {name: name for name in PIPELINE}, type=str)


@app.callback()
def _main() -> None:
    silence()  # before anything imports Prefect: no analytics from any command


def _setup_logging(prefect: bool = False) -> None:
    """Log lines on stderr with secrets masked; ``prefect``: import Prefect first (it installs its own
    handlers) and filter those too."""
    if prefect:
        import prefect  # noqa: F401
    from multitag.logs import setup_logging
    setup_logging()


def _stop_on_interrupt(command: str) -> None:
    """Ctrl-C (SIGINT) stops a pipeline or retrain run at once: the running stage and everything else
    this process started are terminated, one line says what was interrupted and how to resume, and
    the process exits with 130. (Left to itself, Prefect would spend minutes reporting to its
    temporary API server, which Ctrl-C has already stopped.)"""
    import signal

    def stop(signum, frame):
        from tasks.dvc import RUNNING

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C changes nothing
        stage = f"stage {RUNNING['stage']}" if RUNNING.get("stage") else "the pipeline"
        log.error("interrupted during %s; run `multitag %s` again to resume: stages already done are skipped and "
                  "training continues from its last epoch checkpoint", stage, command)
        for handler in logging.getLogger().handlers:
            handler.flush()
        _terminate_children()
        os._exit(EXIT_INTERRUPTED)

    signal.signal(signal.SIGINT, stop)


def _terminate_children(grace: float = 5) -> None:
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(children, timeout=grace)
    for child in alive:
        child.kill()


def _fail(err: BaseException) -> None:
    """Print a one-paragraph error (no traceback for expected failures) and exit with its status."""
    log.error("%s", err)
    raise typer.Exit(exit_code(err))


@app.command("sample-data")
def sample_data(
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: sample.out in params.yaml)")] = None,
    n_images: Annotated[Optional[int], typer.Option(help="Number of images (default: sample.n_images)")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed (default: sample.seed)")] = None,
    preset: Annotated[Optional[str], typer.Option(help="digits (the demo's) or hard (photos, 18 long-tailed labels, "
                                                       "missing tags: to tell recipes apart)")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Image side in px (default: sample.image_size; 128 for hard)")] = None,
    params: Annotated[Path, typer.Option(help="params.yaml to read")] = Path("params.yaml"),
):
    """Write built-in sample data: scikit-learn's handwritten digits composed into multi-label images,
    or, with --preset hard, photos with digits and shapes in a long tail (see multitag/hard_data.py)."""
    from multitag.config import Params, SampleParams
    from multitag.sample_data import write_sample_data

    _setup_logging()
    try:
        p = load_params(params) if params.exists() else Params()
        if preset == "hard" and image_size is None:
            image_size = max(128, p.sample.image_size)
        updates = {k: v for k, v in {"n_images": n_images, "seed": seed, "preset": preset,
                                     "image_size": image_size}.items() if v is not None}
        sample = SampleParams.model_validate({**p.sample.model_dump(), **updates})
        result = write_sample_data(sample, out, p.ingest.val_fraction, p.ingest.test_fraction)
    except EXPECTED as err:
        _fail(err)
    typer.echo(f"{result.images} images ({result.empty} without labels), annotations: {result.annotations}")


@app.command()
def stage(
    name: Annotated[Stage, typer.Argument(help="Stage to run (what dvc.yaml calls)")],
    params: Annotated[Path, typer.Option(help="params.yaml to read")] = Path("params.yaml"),
):
    """Run one pipeline stage in the workspace of PARAMS (what dvc.yaml's stages call)."""
    from multitag.lineage import check_store_env

    _setup_logging()
    try:
        p = load_params(params)
        check_store_env(p)
        importlib.import_module(STAGE_MODULES[name.value]).run(p, Layout(params.parent))
    except EXPECTED as err:
        _fail(err)
    except KeyboardInterrupt:
        log.error("stage %s interrupted", name.value)
        raise typer.Exit(EXIT_INTERRUPTED) from None


@app.command()
def run(
    workdir: Annotated[Path, typer.Option(help="DVC workspace holding dvc.yaml and params.yaml")] = Path("."),
):
    """Run the whole training pipeline as a Prefect flow (each stage through DVC) and print a summary."""
    import time

    from flows.pipeline import summary_table, training_pipeline

    _setup_logging(prefect=True)
    _stop_on_interrupt("run")
    start = time.time()
    try:
        load_params(workdir / "params.yaml")
        summary = training_pipeline(workdir=str(workdir.resolve()))
    except EXPECTED as err:  # a failed stage's own output is already in the log above
        _fail(err)
    typer.echo(summary_table(summary, time.time() - start))


@app.command()
def predict(
    folder: Annotated[str, typer.Argument(help="Folder of images (searched recursively), or s3://bucket/prefix")],
    model: Annotated[str, typer.Option(help="Registry alias or version (champion, 3, v3), or a model file")] = "champion",
    out: Annotated[str, typer.Option(help="File to write: .csv or .parquet, a path or s3://bucket/key")] = "predictions.csv",
    thresholds: Annotated[Optional[Path], typer.Option(help="thresholds.json for a model.pt file (default 0.5)")] = None,
    engine: Annotated[str, typer.Option(help="torch (eager PyTorch) or onnx (the version's model.onnx in ONNX Runtime)")] = "torch",
    params: Annotated[Path, typer.Option(help="params.yaml naming the store and the registered model")] = Path("params.yaml"),
):
    """Predict labels and per-label probabilities for every image in FOLDER (a folder or an S3 prefix)."""
    from multitag.predict import predict_folder
    from multitag.storage import open_store

    _setup_logging()
    try:
        p = load_params(params)
        result = predict_folder(folder, model, open_store(p.store.uri, params.parent), p.register.name, out,
                                str(thresholds) if thresholds else None, engine=engine, compute=p.compute)
    except EXPECTED as err:
        _fail(err)
    typer.echo(f"{result['predicted']} images predicted, {result['failed']} unreadable ({result['images']} files) "
               f"with {result['model']}: {result['out']}")


@app.command()
def suggest(
    source: Annotated[str, typer.Argument(help="Unlabelled images: a folder (searched recursively) or s3://bucket/prefix")],
    n: Annotated[int, typer.Option(help="How many images to suggest")] = 50,
    model: Annotated[str, typer.Option(help="Registry alias or version, or a model file")] = "champion",
    out: Annotated[Path, typer.Option(help="Folder for suggestions.csv and suggestions.png")] = Path("suggestions"),
    batch: Annotated[Optional[Path], typer.Option(help="Also write the chosen images as an inbox batch folder, "
                                                      "with a labels.csv whose tags a person fills in")] = None,
    diversity: Annotated[float, typer.Option(help="How strongly near-duplicates are kept apart (0 = off)")] = 0.5,
    params: ParamsOption = Path("params.yaml"),
):
    """Rank unlabelled images by how much annotating them would help the champion (labels near their
    tuned thresholds), keeping near-duplicates apart; write the top N as a CSV and a contact sheet."""
    import tempfile

    import numpy as np

    from multitag.layout import select_device
    from multitag.predict import ImageSource, decode_batch, open_model
    from multitag.suggest import suggest as rank, write_batch_skeleton, write_suggestions

    _setup_logging()
    try:
        if n < 1:
            raise ValueError("--n must be at least 1")
        registry = _registry(params)
        source_ = ImageSource(source)
        if not source_.names:
            raise FileNotFoundError(f"no image files in {source}")
        with tempfile.TemporaryDirectory() as tmp:
            predictor, desc, _ = open_model(model, registry, None, "torch", Path(tmp), select_device("auto"))
            names, arrays, errors = decode_batch(source_, source_.names, predictor.image_size)
        if not names:
            raise ValueError(f"none of the {len(errors)} image files in {source} could be read; first: "
                             f"{next(iter(errors.items()))}")
        images = np.stack(arrays)
        table = rank(names, images, predictor.scores(images), predictor.thresholds, predictor.labels, n, diversity)
        skeleton = write_batch_skeleton(table, source_.read, batch) if batch else None  # first: it may refuse
        out.mkdir(parents=True, exist_ok=True)
        write_suggestions(table, dict(zip(names, images)), out)
    except EXPECTED as err:
        _fail(err)
    for name, error in list(errors.items())[:5]:
        log.warning("%s left out: %s", name, error)
    typer.echo(f"{len(table)} of {len(names)} images suggested with {desc}: {out / 'suggestions.csv'}, "
               f"{out / 'suggestions.png'}" + (f"; batch to fill in: {skeleton}" if skeleton else "")
               + (f" ({len(errors)} unreadable left out)" if errors else ""))


review_app = typer.Typer(no_args_is_help=True, help="Label review (the review stage): act on its findings.")
app.add_typer(review_app, name="review")


@review_app.command("export")
def review_export(out: Annotated[Path, typer.Option(help="New folder for the relabel batch")] = Path("relabel-batch"),
                  workdir: Annotated[Path, typer.Option(help="DVC workspace")] = Path(".")):
    """Write the rows of reports/label_issues.csv whose accept cell says yes as an inbox batch (the
    images and a labels.csv with their suggested labels): then `multitag inbox add OUT`."""
    from multitag.inbox import review_batch
    from multitag.ingest import images_root
    from multitag.lineage import ingest_params

    _setup_logging()
    try:
        p = load_params(workdir / "params.yaml")
        ingest = ingest_params(p)
        count = review_batch(Layout(workdir), images_root(ingest, ingest.format), out)
    except EXPECTED as err:
        _fail(err)
    typer.echo(f"{count} corrected image(s) in {out}; add them with: multitag inbox add {out}")


@app.command()
def export(
    version: Annotated[str, typer.Argument(help="Registered version (3, v3) or alias (champion)")],
    out: Annotated[Path, typer.Option(help="Folder to write model.onnx into")] = Path("export"),
    format: Annotated[str, typer.Option(help="onnx (the only format)")] = "onnx",
    params: ParamsOption = Path("params.yaml"),
):
    """Write a registered version as model.onnx (dynamic batch, sigmoid outputs, labels and tuned
    thresholds in its metadata) for a serving stack; versions registered before ONNX export too."""
    import tempfile

    from multitag.serving import export_onnx

    _setup_logging()
    try:
        if format != "onnx":
            raise ValueError(f"--format: unknown format {format!r}; onnx is the one there is")
        registry = _registry(params)
        with tempfile.TemporaryDirectory() as tmp:
            v, card = registry.download_model(version, Path(tmp) / "model.pt")
            path = export_onnx(Path(tmp) / "model.pt", out / "model.onnx", card["thresholds"])
    except EXPECTED as err:
        _fail(err)
    typer.echo(f"{registry.name} v{v} -> {path} (input images: float32 N x 3 x {card['params']['ingest']['image_size']} x "
               f"{card['params']['ingest']['image_size']} in [0, 1]; output probabilities: N x {len(card['labels'])})")


models_app = typer.Typer(no_args_is_help=True, help="List, inspect, promote and roll back registered models.")
remote_app = typer.Typer(no_args_is_help=True, help="The DVC remote that versioned data and models are pushed to.")
app.add_typer(models_app, name="models")
inbox_app = typer.Typer(no_args_is_help=True, help="New batches of annotated images for scheduled retraining.")
app.add_typer(remote_app, name="remote")
app.add_typer(inbox_app, name="inbox")


def _registry(params: Path):
    from multitag.registry import Registry
    from multitag.storage import open_store

    p = load_params(params)
    return Registry(open_store(p.store.uri, params.parent), p.register.name)


def _registry_call(params: Path, fn):
    """Run fn(registry) with the store's errors reported plainly."""
    _setup_logging()
    try:
        return fn(_registry(params))
    except EXPECTED as err:
        _fail(err)


@models_app.command("list")
def models_list(params: ParamsOption = Path("params.yaml")):
    """Every complete version, oldest first; * marks the champion."""
    def show(reg):
        champ = reg.alias("champion")
        champ_v = champ[0]["version"] if champ else None
        typer.echo(f"{'':2}{'version':>7}  {'created':25}  {'test mAP':>8}  test set")
        for v in reg.versions():
            mark = "*" if v["version"] == champ_v else ""
            score = f"{v['test_map']:>8.4f}" if v["test_map"] is not None else f"{'-':>8}"
            typer.echo(f"{mark:2}{v['version']:>7}  {v['created_at']:25}  {score}  {v['test_set']}")
        for version in reg.incomplete():
            mark = "*" if version == champ_v else ""
            typer.echo(f"{mark:2}{version:>7}  incomplete or damaged: no version record (not served)")
    _registry_call(params, show)


@models_app.command("show")
def models_show(ref: Annotated[str, typer.Argument(help="Version number or alias (champion)")] = "champion",
                params: ParamsOption = Path("params.yaml")):
    """Print a version's model card."""
    def show(reg):
        typer.echo(reg.store.get_bytes(reg.version_key(reg.resolve(ref), "MODEL_CARD.md"))[0].decode())
    _registry_call(params, show)


@models_app.command("promote")
def models_promote(version: Annotated[int, typer.Argument(help="Version to make the champion")],
                   reason: Annotated[str, typer.Option(help="Why (recorded in the alias)")],
                   params: ParamsOption = Path("params.yaml")):
    """Make VERSION the champion, whatever its metrics; the reason is recorded."""
    rec = _registry_call(params, lambda reg: reg.promote(version, reason))
    typer.echo(f"champion -> v{rec['version']} ({rec['reason']})")


@models_app.command("rollback")
def models_rollback(reason: Annotated[str, typer.Option(help="Why (recorded in the alias)")] = "rollback",
                    params: ParamsOption = Path("params.yaml")):
    """Point the champion back at the version it replaced."""
    rec = _registry_call(params, lambda reg: reg.rollback(reason))
    typer.echo(f"champion -> v{rec['version']} ({rec['reason']})")


@remote_app.command("setup")
def remote_setup(url: Annotated[str, typer.Argument(help="s3://bucket/prefix (or any URL DVC supports)")],
                 name: Annotated[str, typer.Option(help="Remote name")] = "storage",
                 workdir: Annotated[Path, typer.Option(help="DVC workspace")] = Path(".")):
    """Make URL the default DVC remote (endpoint from AWS_ENDPOINT_URL; credentials stay in the
    environment, never in the config). A pipeline run then pushes its data and models there."""
    import subprocess

    _setup_logging()
    dvc = [sys.executable, "-m", "dvc"]
    cmds = [[*dvc, "remote", "add", "--default", "--force", name, url]]
    if os.environ.get("AWS_ENDPOINT_URL") and url.startswith("s3://"):
        cmds.append([*dvc, "remote", "modify", name, "endpointurl", os.environ["AWS_ENDPOINT_URL"]])
    for cmd in cmds:
        proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
        if proc.returncode != 0:
            _fail(RuntimeError(f"{' '.join(cmd[2:])} failed: {proc.stderr.strip()}"))
    typer.echo(f"DVC remote {name!r} -> {url} (default); `git add .dvc/config` to share it")


WorkdirOption = Annotated[Path, typer.Option(help="DVC workspace holding dvc.yaml and params.yaml")]


@inbox_app.command("add")
def inbox_add(
    folder: Annotated[Path, typer.Argument(help="Folder with images and one annotations file (any supported format)")],
    annotations: Annotated[Optional[str], typer.Option(help="The annotations file inside FOLDER (default: the only one)")] = None,
    format: Annotated[Optional[str], typer.Option(help="auto | tags_csv | multihot_csv | jsonl | coco | voc")] = None,
    image_column: Annotated[Optional[str], typer.Option(help="CSV column of image paths")] = None,
    tags_column: Annotated[Optional[str], typer.Option(help="CSV column of labels")] = None,
    delimiter: Annotated[Optional[str], typer.Option(help="Between labels in the tags column")] = None,
    no_label: Annotated[Optional[str], typer.Option(help='A tag meaning "no labels", e.g. "No Finding"')] = None,
    images: Annotated[Optional[str], typer.Option(help="Folder inside FOLDER that image paths are relative to")] = None,
    name: Annotated[Optional[str], typer.Option(help="Batch name (default: UTC time + folder name)")] = None,
    workdir: WorkdirOption = Path("."),
):
    """Validate FOLDER and copy it into the inbox as one batch; its _READY.json marker is written
    last, so the retrain flow never sees a half-copied batch. CSV options default to params.yaml's."""
    from multitag.errors import BatchRejected
    from multitag.inbox import Inbox

    _setup_logging()
    try:
        p = load_params(workdir / "params.yaml")
        options = {"annotations": annotations, "format": format, "image_column": image_column,
                   "tags_column": tags_column, "delimiter": delimiter, "no_label": no_label, "images": images}
        batch, content = Inbox(p, workdir).add(folder, p.ingest, options, name)
    except BatchRejected as err:
        _fail(ValueError(f"{folder}: not added: {err}"))
    except EXPECTED as err:
        _fail(err)
    for r in content.rejected:
        log.warning("%s: %s (%s) will be rejected: %s", folder, r["record"], r["image"], r["reason"])
    typer.echo(f"batch {batch}: {len(content.images)} image(s) added to {p.retrain.inbox}"
               + (f", {len(content.rejected)} record(s) will be rejected" if content.rejected else ""))


@inbox_app.command("list")
def inbox_list(workdir: WorkdirOption = Path(".")):
    """Batches in the inbox: ready (complete) or still arriving."""
    from multitag.inbox import READY, Inbox

    _setup_logging()
    try:
        batches = Inbox(load_params(workdir / "params.yaml"), workdir).batches()
    except EXPECTED as err:
        _fail(err)
    for name, keys in sorted(batches.items()):
        typer.echo(f"{name}  {'ready' if READY in keys else 'arriving'}  {len(keys)} file(s)")


@app.command()
def retrain(workdir: WorkdirOption = Path("."),
            force: Annotated[bool, typer.Option(help="Train even if fewer than retrain.min_new_images arrived")] = False):
    """Run the retrain flow once, now: take in inbox batches, retrain if enough arrived."""
    _setup_logging(prefect=True)
    _stop_on_interrupt("retrain")
    try:
        load_params(workdir / "params.yaml")
        from flows.retrain import retrain as retrain_flow
        s = retrain_flow(workdir=str(workdir.resolve()), force=force)
    except EXPECTED as err:
        _fail(err)
    typer.echo(f"{s['reason']}; " + (f"v{s['pipeline']['version']} test mAP {s['pipeline']['test_map']:.4f}, "
                                     f"champion: {'yes' if s['pipeline']['champion'] else 'no'}"
                                     if s["pipeline"] else "nothing trained"))


def _prefect_env(port: int | None = None) -> dict:
    env = quiet_env()
    if port is not None:
        env.setdefault("PREFECT_UI_API_URL", f"http://127.0.0.1:{port}/api")
    return env


@app.command()
def server(port: Annotated[int, typer.Option(help="Port of the API and UI")] = 4200,
           host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1"):
    """Start a Prefect server (API + UI at http://HOST:PORT); set PREFECT_API_URL=http://HOST:PORT/api
    for `multitag deploy` and `multitag worker`."""

    prefect = str(Path(sys.executable).with_name("prefect"))
    os.execve(prefect, [prefect, "server", "start", "--host", host, "--port", str(port)], _prefect_env(port))


IntervalOption = Annotated[Optional[float], typer.Option(help="Seconds between runs instead of retrain.cron")]
DeploymentOption = Annotated[str, typer.Option(help="Deployment name (one per workspace on a shared server)")]


@app.command()
def deploy(workdir: WorkdirOption = Path("."), interval: IntervalOption = None, name: DeploymentOption = "retrain",
           pool_type: Annotated[str, typer.Option(help="process (this machine) or kubernetes (GPU pods)")] = "process",
           image: Annotated[Optional[str], typer.Option(help="kubernetes: the image built from infra/Dockerfile")] = None,
           repository: Annotated[Optional[str], typer.Option(help="kubernetes: the workspace's git URL, cloned in each pod")] = None,
           pool: Annotated[str, typer.Option(help="kubernetes: the work pool to create or use")] = "multitag-gpu",
           gpus: Annotated[int, typer.Option(help="kubernetes: GPUs per flow-run pod")] = 1):
    """Create (or update) deployments on the Prefect server in PREFECT_API_URL: `retrain` on the
    schedule from params.yaml on a process work pool, one run at a time; with --pool-type kubernetes,
    `retrain` and `training-pipeline` on a Kubernetes work pool of GPU pods."""
    from flows.server import require_api

    _setup_logging()
    try:
        require_api()
        if pool_type == "kubernetes":
            if not image or not repository:
                raise ValueError("--pool-type kubernetes needs --image (built from infra/Dockerfile) and --repository "
                                 "(the workspace's git URL)")
            from flows.deploy import deploy_kubernetes
            ids = deploy_kubernetes(workdir, repository, image, pool, gpus, interval)
            typer.echo(f"deployments retrain/retrain-gpu and training-pipeline/training-pipeline-gpu ({', '.join(ids)}) "
                       f"on Kubernetes work pool {pool!r}; start its worker in the cluster: prefect worker start "
                       f"--pool {pool} --type kubernetes")
            return
        if pool_type != "process":
            raise ValueError(f"--pool-type: unknown {pool_type!r}; choose process or kubernetes")
        from flows.deploy import deploy as deploy_retrain
        deployment = deploy_retrain(workdir, interval, name)
    except EXPECTED as err:
        _fail(err)
    p = load_params(workdir / "params.yaml").retrain
    typer.echo(f"deployment retrain/{name} ({deployment}) on work pool {p.work_pool!r}, "
               + (f"every {interval:g} s" if interval else f"cron {p.cron!r} {p.timezone}")
               + f"; start a worker with: multitag worker --workdir {workdir}")


@app.command()
def worker(workdir: WorkdirOption = Path(".")):
    """Start a Prefect worker on the work pool of params.yaml (retrain.work_pool); needs PREFECT_API_URL."""
    from flows.server import require_api

    _setup_logging()
    try:
        require_api()
        pool = load_params(workdir / "params.yaml").retrain.work_pool
    except EXPECTED as err:
        _fail(err)
    prefect = str(Path(sys.executable).with_name("prefect"))
    os.execve(prefect, [prefect, "worker", "start", "--pool", pool, "--type", "process"], _prefect_env())


@app.command()
def serve(workdir: WorkdirOption = Path("."), interval: IntervalOption = None, name: DeploymentOption = "retrain",
          port: Annotated[int, typer.Option(help="Port of the Prefect server started when PREFECT_API_URL is unset")] = 4200):
    """Schedule and run the retrain flow in this one process (a single machine, no worker). Without
    PREFECT_API_URL it uses the Prefect server on 127.0.0.1:PORT, starting one if none answers there."""
    from flows.server import prefect_api

    _setup_logging()
    try:
        with prefect_api(port, Layout(workdir).root / ".multitag" / "prefect-server.log") as api:
            log.info("schedule on %s (UI: %s)", api, api.removesuffix("/api"))
            from flows.deploy import serve as serve_retrain
            from multitag.logs import install_filters
            install_filters()  # on Prefect's handlers, now that it is imported
            serve_retrain(workdir, interval, name)
    except EXPECTED as err:
        _fail(err)


if __name__ == "__main__":
    app()
