"""The ``multitag`` command: one sub-command per job. Stage commands are what dvc.yaml runs."""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from multitag.config import load_params
from multitag.errors import EXIT_INTERRUPTED, EXPECTED, exit_code
from multitag.layout import PIPELINE, Layout
from multitag.telemetry import quiet_env, silence

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Multi-label image classification pipeline: ingest, labels, train, evaluate, register.")
log = logging.getLogger("multitag")

# Every command names its workspace the same way: the folder holding params.yaml (and dvc.yaml).
WorkdirOption = Annotated[Path, typer.Option(help="Workspace: the folder holding params.yaml and dvc.yaml")]
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


def _stop_on_interrupt(command: str, said: str | None = None) -> None:
    """Ctrl-C (SIGINT) stops a pipeline or retrain run at once: the running stage and everything else
    this process started are terminated, one line says what was interrupted and how to resume, and
    the process exits with 130. (Left to itself, Prefect would spend minutes reporting to its
    temporary API server, which Ctrl-C has already stopped.)"""
    import signal

    def stop(signum, frame):
        from tasks.dvc import RUNNING

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C changes nothing
        stage = f"stage {RUNNING['stage']}" if RUNNING.get("stage") else "the pipeline"
        log.error("%s", said or f"interrupted during {stage}; run `multitag {command}` again to resume: stages already "
                  "done are skipped and training continues from its last epoch checkpoint")
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


def handled(prefect: bool = False):
    """The frame every command shares: logging set up (``prefect``: with Prefect's handlers), and an
    expected failure reported in one paragraph with its exit status instead of a traceback."""
    def wrap(command):
        @functools.wraps(command)
        def run(*args, **kwargs):
            _setup_logging(prefect)
            try:
                return command(*args, **kwargs)
            except EXPECTED as err:
                _fail(err)
        return run
    return wrap


def _params(workdir: Path):
    return load_params(workdir / "params.yaml")


def _registry(workdir: Path):
    from multitag.registry import open_registry
    return open_registry(_params(workdir), workdir)


@app.command("sample-data")
@handled()
def sample_data(
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: sample.out in params.yaml)")] = None,
    n_images: Annotated[Optional[int], typer.Option(help="Number of images (default: sample.n_images)")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed (default: sample.seed)")] = None,
    preset: Annotated[Optional[str], typer.Option(help="digits (the demo's) or hard (photos, 18 long-tailed labels, "
                                                       "missing tags: to tell recipes apart)")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Image side in px (default: sample.image_size; 128 for hard)")] = None,
    workdir: WorkdirOption = Path("."),
):
    """Write built-in sample data: scikit-learn's handwritten digits composed into multi-label images,
    or, with --preset hard, photos with digits and shapes in a long tail (see multitag/hard_data.py)."""
    from multitag.config import Params, SampleParams
    from multitag.sample_data import write_sample_data

    p = _params(workdir) if (workdir / "params.yaml").exists() else Params()
    if preset == "hard" and image_size is None:
        image_size = max(128, p.sample.image_size)
    updates = {k: v for k, v in {"n_images": n_images, "seed": seed, "preset": preset,
                                 "image_size": image_size}.items() if v is not None}
    sample = SampleParams.model_validate({**p.sample.model_dump(), **updates})
    result = write_sample_data(sample, out, p.ingest.val_fraction, p.ingest.test_fraction)
    typer.echo(f"{result.images} images ({result.empty} without labels), annotations: {result.annotations}")


@app.command()
def stage(name: Annotated[Stage, typer.Argument(help="Stage to run (what dvc.yaml calls)")],
          workdir: WorkdirOption = Path(".")):
    """Run one pipeline stage in the workspace WORKDIR (what dvc.yaml's stages call)."""
    try:
        _run_stage(name.value, workdir)
    except KeyboardInterrupt:
        log.error("stage %s interrupted", name.value)
        _terminate_children()  # e.g. torchrun and its workers
        raise typer.Exit(EXIT_INTERRUPTED) from None


@handled()
def _run_stage(name: str, workdir: Path) -> None:
    from multitag.stages import run_stage

    run_stage(name, workdir)


@contextlib.contextmanager
def _flow_api():
    """The Prefect API a flow run from this command reports to: the configured one, or a temporary
    server (flows/server.py) that starts while the flows, DVC and torch load (seconds each; the stages
    run in the flow's process, tasks/dvc.py) instead of one after the other."""
    from flows.server import temporary_api

    with temporary_api() as wait:
        import dvc.repo  # noqa: F401
        import flows.retrain  # noqa: F401  (and flows.pipeline)
        import multitag.train  # noqa: F401
        wait()
        yield


@app.command()
@handled(prefect=True)
def run(workdir: WorkdirOption = Path(".")):
    """Run the whole training pipeline as a Prefect flow (each stage through DVC) and print a summary."""
    import time

    _stop_on_interrupt("run")
    start = time.time()
    _params(workdir)  # a bad params.yaml stops here, before Prefect starts
    with _flow_api():
        from flows.pipeline import summary_table, training_pipeline

        summary = training_pipeline(workdir=str(workdir.resolve()))
    typer.echo(summary_table(summary, time.time() - start))


@app.command()
@handled(prefect=True)
def tune(workdir: WorkdirOption = Path("."),
         budget: Annotated[Optional[str], typer.Option(help="Wall-clock time, e.g. 20m, 1h30m, 900 (default: tune.budget)")] = None,
         resume: Annotated[bool, typer.Option(help="Go on with what an interrupted tune had left of its budget")] = False,
         trials: Annotated[Optional[int], typer.Option(help="At most this many trials (besides the baseline)")] = None,
         apply: Annotated[bool, typer.Option(help="Write the winning recipe into params.yaml")] = False):
    """Search the training recipe on the prepared data (after `multitag run`) within a time budget:
    Optuna trials scored on the validation split; prints the best recipe as a params.yaml diff, which
    --apply writes (then `multitag run` trains it)."""
    from multitag.tune import apply as apply_recipe

    _stop_on_interrupt("tune", "interrupted: finished trials are kept in .multitag/tune/study.db; run `multitag tune "
                               "--resume` to spend what the budget had left")
    min_gain = _params(workdir).tune.min_gain
    with _flow_api():
        from flows.tune import tune_flow

        t = tune_flow(workdir=str(workdir.resolve()), budget=budget, resume=resume, max_trials=trials)
    states = [tr["state"] for tr in t["trials"]]
    typer.echo(f"study {t['study']}: {len(states)} trials ({states.count('complete')} finished, "
               f"{states.count('pruned')} pruned, {states.count('fail')} failed), {t['spent_s']:.0f} s")
    b, best = t["baseline"], t["best"]
    typer.echo(f"the workspace's recipe: val mAP {b.get('val_map', '-')}, test mAP {b.get('test_map', '-')}")
    if best:
        typer.echo(f"best trial {best['number']}: val mAP {best['val_map']:.4f}, test mAP {best['test_map']}")
    if not t["diff"]:
        typer.echo(f"no trial beat the workspace's recipe by tune.min_gain ({min_gain}) or more: "
                   "params.yaml needs no change")
        return
    typer.echo(t["diff"], nl=False)
    if apply:
        apply_recipe(workdir / "params.yaml", t["recipe"])
        typer.echo("params.yaml updated; `multitag run` trains the tuned recipe")
    else:
        typer.echo("`multitag tune --trials 0 --apply` writes it without searching further")


@app.command()
@handled()
def predict(
    folder: Annotated[str, typer.Argument(help="Folder of images (searched recursively), or s3://bucket/prefix")],
    model: Annotated[str, typer.Option(help="Registry alias or version (champion, 3, v3), or a model file")] = "champion",
    out: Annotated[str, typer.Option(help="File to write: .csv or .parquet, a path or s3://bucket/key")] = "predictions.csv",
    thresholds: Annotated[Optional[Path], typer.Option(help="thresholds.json for a model.pt file (default 0.5)")] = None,
    engine: Annotated[str, typer.Option(help="torch (eager PyTorch) or onnx (the version's model.onnx in ONNX Runtime)")] = "torch",
    workdir: WorkdirOption = Path("."),
):
    """Predict labels and per-label probabilities for every image in FOLDER (a folder or an S3 prefix)."""
    from multitag.predict import predict_folder
    from multitag.storage import open_store

    p = _params(workdir)
    result = predict_folder(folder, model, open_store(p.store.uri, workdir), p.register.name, out,
                            str(thresholds) if thresholds else None, engine=engine, compute=p.compute)
    typer.echo(f"{result['predicted']} images predicted, {result['failed']} unreadable ({result['images']} files) "
               f"with {result['model']}: {result['out']}")


@app.command()
@handled()
def suggest(
    source: Annotated[str, typer.Argument(help="Unlabelled images: a folder (searched recursively) or s3://bucket/prefix")],
    n: Annotated[int, typer.Option(help="How many images to suggest")] = 50,
    model: Annotated[str, typer.Option(help="Registry alias or version, or a model file")] = "champion",
    out: Annotated[Path, typer.Option(help="Folder for suggestions.csv and suggestions.png")] = Path("suggestions"),
    batch: Annotated[Optional[Path], typer.Option(help="Also write the chosen images as an inbox batch folder, "
                                                      "with a labels.csv whose tags a person fills in")] = None,
    diversity: Annotated[float, typer.Option(help="How strongly near-duplicates are kept apart (0 = off)")] = 0.5,
    workdir: WorkdirOption = Path("."),
):
    """Rank unlabelled images by how much annotating them would help the champion (labels near their
    tuned thresholds), keeping near-duplicates apart; write the top N as a CSV and a contact sheet."""
    from multitag.suggest import suggest_folder

    r = suggest_folder(source, n, model, _registry(workdir), out, batch, diversity)
    for name, error in list(r["errors"].items())[:5]:
        log.warning("%s left out: %s", name, error)
    typer.echo(f"{len(r['table'])} of {r['images']} images suggested with {r['model']}: {out / 'suggestions.csv'}, "
               f"{out / 'suggestions.png'}" + (f"; batch to fill in: {r['batch']}" if r["batch"] else "")
               + (f" ({len(r['errors'])} unreadable left out)" if r["errors"] else ""))


review_app = typer.Typer(no_args_is_help=True, help="Label review (the review stage): act on its findings.")
app.add_typer(review_app, name="review")


@review_app.command("export")
@handled()
def review_export(out: Annotated[Path, typer.Option(help="New folder for the relabel batch")] = Path("relabel-batch"),
                  workdir: WorkdirOption = Path(".")):
    """Write the rows of reports/label_issues.csv whose accept cell says yes as an inbox batch (the
    images and a labels.csv with their suggested labels): then `multitag inbox add OUT`."""
    from multitag.formats import images_root
    from multitag.inbox import review_batch
    from multitag.lineage import ingest_params

    ingest = ingest_params(_params(workdir))
    count = review_batch(Layout(workdir), images_root(ingest, ingest.format), out)
    typer.echo(f"{count} corrected image(s) in {out}; add them with: multitag inbox add {out}")


@app.command()
@handled()
def export(
    version: Annotated[str, typer.Argument(help="Registered version (3, v3) or alias (champion)")],
    out: Annotated[Path, typer.Option(help="Folder to write model.onnx into")] = Path("export"),
    format: Annotated[str, typer.Option(help="onnx (the only format)")] = "onnx",
    workdir: WorkdirOption = Path("."),
):
    """Write a registered version as model.onnx (dynamic batch, sigmoid outputs, labels and tuned
    thresholds in its metadata) for a serving stack; versions registered before ONNX export too."""
    import tempfile

    from multitag.serving import export_onnx

    if format != "onnx":
        raise ValueError(f"--format: unknown format {format!r}; onnx is the one there is")
    registry = _registry(workdir)
    with tempfile.TemporaryDirectory() as tmp:
        v, card = registry.download_model(version, Path(tmp) / "model.pt")
        path = export_onnx(Path(tmp) / "model.pt", out / "model.onnx", card["thresholds"])
    size = card["params"]["ingest"]["image_size"]
    typer.echo(f"{registry.name} v{v} -> {path} (input images: float32 N x 3 x {size} x {size} in [0, 1]; "
               f"output probabilities: N x {len(card['labels'])})")


models_app = typer.Typer(no_args_is_help=True, help="List, inspect, promote and roll back registered models.")
remote_app = typer.Typer(no_args_is_help=True, help="The DVC remote that versioned data and models are pushed to.")
inbox_app = typer.Typer(no_args_is_help=True, help="New batches of annotated images for scheduled retraining.")
app.add_typer(models_app, name="models")
app.add_typer(remote_app, name="remote")
app.add_typer(inbox_app, name="inbox")


@models_app.command("list")
@handled()
def models_list(workdir: WorkdirOption = Path(".")):
    """Every complete version, oldest first; * marks the champion."""
    reg = _registry(workdir)
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


@models_app.command("show")
@handled()
def models_show(ref: Annotated[str, typer.Argument(help="Version number or alias (champion)")] = "champion",
                workdir: WorkdirOption = Path(".")):
    """Print a version's model card."""
    reg = _registry(workdir)
    typer.echo(reg.store.get_bytes(reg.version_key(reg.resolve(ref), "MODEL_CARD.md"))[0].decode())


@models_app.command("promote")
@handled()
def models_promote(version: Annotated[int, typer.Argument(help="Version to make the champion")],
                   reason: Annotated[str, typer.Option(help="Why (recorded in the alias)")],
                   workdir: WorkdirOption = Path(".")):
    """Make VERSION the champion, whatever its metrics; the reason is recorded."""
    rec = _registry(workdir).promote(version, reason)
    typer.echo(f"champion -> v{rec['version']} ({rec['reason']})")


@models_app.command("rollback")
@handled()
def models_rollback(reason: Annotated[str, typer.Option(help="Why (recorded in the alias)")] = "rollback",
                    workdir: WorkdirOption = Path(".")):
    """Point the champion back at the version it replaced."""
    rec = _registry(workdir).rollback(reason)
    typer.echo(f"champion -> v{rec['version']} ({rec['reason']})")


@remote_app.command("setup")
@handled()
def remote_setup(url: Annotated[str, typer.Argument(help="s3://bucket/prefix (or any URL DVC supports)")],
                 name: Annotated[str, typer.Option(help="Remote name")] = "storage",
                 workdir: WorkdirOption = Path(".")):
    """Make URL the default DVC remote (endpoint from AWS_ENDPOINT_URL; credentials stay in the
    environment, never in the config). A pipeline run then pushes its data and models there."""
    import subprocess

    dvc = [sys.executable, "-m", "dvc"]
    cmds = [[*dvc, "remote", "add", "--default", "--force", name, url]]
    if os.environ.get("AWS_ENDPOINT_URL") and url.startswith("s3://"):
        cmds.append([*dvc, "remote", "modify", name, "endpointurl", os.environ["AWS_ENDPOINT_URL"]])
    for cmd in cmds:
        proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[2:])} failed: {proc.stderr.strip()}")
    typer.echo(f"DVC remote {name!r} -> {url} (default); `git add .dvc/config` to share it")


@inbox_app.command("add")
@handled()
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

    p = _params(workdir)
    options = {"annotations": annotations, "format": format, "image_column": image_column,
               "tags_column": tags_column, "delimiter": delimiter, "no_label": no_label, "images": images}
    try:
        batch, content = Inbox(p, workdir).add(folder, p.ingest, options, name)
    except BatchRejected as err:
        raise ValueError(f"{folder}: not added: {err}") from None
    for r in content.rejected:
        log.warning("%s: %s (%s) will be rejected: %s", folder, r["record"], r["image"], r["reason"])
    typer.echo(f"batch {batch}: {len(content.images)} image(s) added to {p.retrain.inbox}"
               + (f", {len(content.rejected)} record(s) will be rejected" if content.rejected else ""))


@inbox_app.command("list")
@handled()
def inbox_list(workdir: WorkdirOption = Path(".")):
    """Batches in the inbox: ready (complete) or still arriving."""
    from multitag.inbox import READY, Inbox

    for name, keys in sorted(Inbox(_params(workdir), workdir).batches().items()):
        typer.echo(f"{name}  {'ready' if READY in keys else 'arriving'}  {len(keys)} file(s)")


@app.command()
@handled(prefect=True)
def retrain(workdir: WorkdirOption = Path("."),
            force: Annotated[bool, typer.Option(help="Train even if fewer than retrain.min_new_images arrived")] = False):
    """Run the retrain flow once, now: take in inbox batches, retrain if enough arrived."""
    _stop_on_interrupt("retrain")
    _params(workdir)  # a bad params.yaml stops here, before Prefect starts
    with _flow_api():
        from flows.retrain import retrain as retrain_flow

        s = retrain_flow(workdir=str(workdir.resolve()), force=force)
    typer.echo(f"{s['reason']}; " + (f"v{s['pipeline']['version']} test mAP {s['pipeline']['test_map']:.4f}, "
                                     f"champion: {'yes' if s['pipeline']['champion'] else 'no'}"
                                     if s["pipeline"] else "nothing trained"))


def _exec_prefect(args: list[str], port: int | None = None) -> None:
    """Replace this process by Prefect's own command (server, worker), analytics off; on any port
    but 4200 the UI must be told where its API is."""
    env = quiet_env()
    if port is not None:
        env.setdefault("PREFECT_UI_API_URL", f"http://127.0.0.1:{port}/api")
    prefect = str(Path(sys.executable).with_name("prefect"))
    os.execve(prefect, [prefect, *args], env)


@app.command()
def server(port: Annotated[int, typer.Option(help="Port of the API and UI")] = 4200,
           host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1"):
    """Start a Prefect server (API + UI at http://HOST:PORT); set PREFECT_API_URL=http://HOST:PORT/api
    for `multitag deploy` and `multitag worker`."""
    _exec_prefect(["server", "start", "--host", host, "--port", str(port)], port)


IntervalOption = Annotated[Optional[float], typer.Option(help="Seconds between runs instead of retrain.cron")]
DeploymentOption = Annotated[str, typer.Option(help="Deployment name (one per workspace on a shared server)")]


@app.command()
@handled()
def deploy(workdir: WorkdirOption = Path("."), interval: IntervalOption = None, name: DeploymentOption = "retrain",
           pool_type: Annotated[str, typer.Option(help="process (this machine) or kubernetes (GPU pods)")] = "process",
           image: Annotated[Optional[str], typer.Option(help="kubernetes: the image built from infra/Dockerfile")] = None,
           repository: Annotated[Optional[str], typer.Option(help="kubernetes: the workspace's git URL, cloned in each pod")] = None,
           pool: Annotated[str, typer.Option(help="kubernetes: the work pool to create or use")] = "multitag-gpu",
           gpus: Annotated[int, typer.Option(help="kubernetes: GPUs per flow-run pod")] = 1):
    """Create (or update) deployments on the Prefect server in PREFECT_API_URL: `retrain` on the
    schedule from params.yaml on a process work pool, one run at a time; with --pool-type kubernetes,
    `retrain` and `training-pipeline` on a Kubernetes work pool of GPU pods."""
    from flows.deploy import deploy_workspace
    from flows.server import require_api

    require_api()
    typer.echo(deploy_workspace(workdir, pool_type, interval, name, image, repository, pool, gpus))


@app.command()
def worker(workdir: WorkdirOption = Path(".")):
    """Start a Prefect worker on the work pool of params.yaml (retrain.work_pool); needs PREFECT_API_URL."""
    _exec_prefect(["worker", "start", "--pool", _worker_pool(workdir), "--type", "process"])


@handled()
def _worker_pool(workdir: Path) -> str:
    from flows.server import require_api

    require_api()
    return _params(workdir).retrain.work_pool


@app.command()
@handled()
def serve(workdir: WorkdirOption = Path("."), interval: IntervalOption = None, name: DeploymentOption = "retrain",
          port: Annotated[int, typer.Option(help="Port of the Prefect server started when PREFECT_API_URL is unset")] = 4200):
    """Schedule and run the retrain flow in this one process (a single machine, no worker). Without
    PREFECT_API_URL it uses the Prefect server on 127.0.0.1:PORT, starting one if none answers there."""
    from flows.server import prefect_api

    with prefect_api(port, Layout(workdir).prefect_server_log) as api:
        log.info("schedule on %s (UI: %s)", api, api.removesuffix("/api"))
        from flows.deploy import serve as serve_retrain
        from multitag.logs import install_filters
        install_filters()  # on Prefect's handlers, now that it is imported
        serve_retrain(workdir, interval, name)


def main() -> None:
    """The `multitag` command (pyproject's script; torchrun's workers run it as a module). It ends
    without the interpreter's teardown of every loaded module, 2 s of one core once torch, Prefect and
    DVC are loaded, that would change nothing: Python's exit steps before it still run (threads' exit
    hooks, such as Prefect sending its last log lines, then each atexit handler), and this one,
    registered before any but logging's, runs last: it shuts logging down and exits with the
    command's status."""
    status = 0

    def end() -> None:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)

    atexit.register(end)
    try:
        app()
    except SystemExit as stop:  # how typer ends every command; a message instead of a number: status 1
        status = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
        raise
    except KeyboardInterrupt:
        status = EXIT_INTERRUPTED
        raise
    except BaseException:  # a bug: Python prints its traceback first
        status = 1
        raise


if __name__ == "__main__":
    main()
