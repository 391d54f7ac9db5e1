"""The `tune` flow: `multitag tune` as a Prefect flow, each trial a task named after its recipe (the UI
lists the trials), and the study as the ``tune-study`` artifact, updated after every trial: baseline
and best trial, optimisation history, every trial's recipe and validation mAP, parameter importances,
the params.yaml diff (multitag/tune.py)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.pipeline import describe_run, run_name
from multitag.layout import Layout
from multitag.tune import one_by_one, tune
from tasks.stages import tune_markdown


@task(cache_policy=NO_CACHE)
def trial(work) -> dict:
    """One trial: train a recipe under its time budget, scored on the validation split."""
    outcome = work()
    get_run_logger().info("%s: val mAP %s after %d epoch(s)%s", outcome["state"], outcome["val_map"], outcome["epochs"],
                          f" on Dask worker {outcome['worker']}" if "worker" in outcome else "")
    return outcome


def _trials(jobs: list[tuple]) -> list:
    """Each (name, work) a task run named after its trial, run at once when there are several (each
    waits on its Dask task); each outcome, or the exception its task raised (the search goes on)."""
    if len(jobs) == 1:  # in the flow's own thread, where Ctrl-C reaches the training
        [(name, work)] = jobs
        return one_by_one([(name, lambda: trial.with_options(task_run_name=name)(work))])
    return one_by_one([(name, trial.with_options(task_run_name=name).submit(work).result) for name, work in jobs])


def _publish(tuning) -> None:
    create_markdown_artifact(key="tune-study", markdown=tune_markdown(tuning),
                             description="tune: every trial, the best recipe and its params.yaml diff")


@flow(name="tune", flow_run_name=run_name("tune"))
def tune_flow(workdir: str = ".", budget: str | None = None, resume: bool = False,
              max_trials: int | None = None) -> dict:
    """Search the training recipe on the workspace's prepared data within ``budget``."""
    ws = Layout(Path(workdir).resolve())
    tuning = tune(ws, budget, resume, max_trials, on_trial=_publish, run_trials=_trials)
    _publish(tuning)
    best = tuning.best
    describe_run(f"tune {ws.root.name}: {len(tuning.trials)} trials, best val mAP {best['val_map']:.4f}" if best else
                 f"tune {ws.root.name}: no trial finished", data=tuning.study.removeprefix("data-")[:6])
    return asdict(tuning)
