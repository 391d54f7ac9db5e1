"""`multitag tune`: the training recipe fitted to the workspace's prepared data within a wall-clock
budget, with Optuna.

The search runs on the data `multitag run` prepared (data/prepared, data/labels). Each trial trains
on the train split for ``tune.trial_s`` seconds (train.time_budget_s: epochs and schedule fitted to
that time) and is scored on the validation split after every epoch. Optuna's TPE sampler picks each
next recipe from the finished ones; its Hyperband pruner stops a trial whose validation mAP falls
behind the others' at the same epoch. The baseline is the workspace's own recipe as `multitag run`
trains it (its epochs or its time budget), trained first; a new study's first trial is that recipe
again at the trial's time (where the space holds its values), so that training longer is one of the
recipes weighed. The test split is read once, at the end: the best trial's model and the baseline's
are each scored on it.

The study is kept in SQLite (``.multitag/tune/study.db``), one per prepared data set (named by its
content hash): a second tune continues it, and ``resume`` spends what an interrupted tune had left
of its budget. A trial that fails (a non-finite loss, out of memory) is recorded as failed and the
search goes on; one that was interrupted is recorded as failed and its recipe queued again.

With ``tune.parallel`` N > 1, N trials are drawn at once and each, like the baseline, trains as a task
on ``compute.dask``'s cluster (``fit_on_worker``): not pruned mid-way, its epochs told to the study when
it ends. A cluster that goes away ends the tune (ComputeError); the trials it held are failed and queued.

Searched (params.yaml's ``tune`` section): lr, weight decay, batch size, schedule, loss (with the
focal gamma or ASL's negative gamma), EMA, augmentation preset, head, model. Not searched: the input
size (ingest.image_size: another size is another ingest) and epochs (the trial's time decides them).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import hashlib
import io
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from multitag.config import TrainParams, TuneParams, duration_s, load_params, parse_params
from multitag.dataset import load_split, select_device
from multitag.errors import ComputeError, ConfigError
from multitag.layout import TUNE, Layout, read_manifest
from multitag.metrics import mean_ap
from multitag.report import write_atomic

log = logging.getLogger(__name__)

BASELINE = "baseline"
# each searched name and the params.yaml key it sets
KEYS = {"lr": "train.lr", "weight_decay": "train.weight_decay", "batch_size": "train.batch_size",
        "schedule": "train.schedule", "loss": "train.loss", "focal_gamma": "train.focal_gamma",
        "asl_gamma_neg": "train.asl_gamma_neg", "ema_decay": "train.ema_decay", "augment": "train.augment.preset",
        "head": "train.head", "model": "train.model", "trial_s": "train.time_budget_s"}


@dataclass
class Tuning:
    """What the study holds after one `multitag tune`."""
    study: str
    trials: list[dict]       # every trial: number, state, val_map, recipe, note
    baseline: dict           # the workspace's recipe: val_map, test_map (or error)
    best: dict | None        # the best finished trial, with its test_map
    diff: str                # params.yaml changed to the best recipe ("" when the baseline is not beaten)
    recipe: dict             # the params.yaml keys that diff sets
    importances: dict        # Optuna's parameter importances (PED-ANOVA), from 3 finished trials
    spent_s: float           # this tune's wall-clock seconds


GAMMAS = {"focal_gamma": (0.5, 4.0), "asl_gamma_neg": (1.0, 6.0)}  # searched for the loss that uses each


def suggest(trial, t: TuneParams) -> dict:
    """One trial's recipe, by searched name; floats to 3 significant digits (what is trained is
    what params.yaml gets)."""
    def three(x: float) -> float:
        return float(f"{x:.3g}")

    recipe = {"lr": three(trial.suggest_float("lr", *t.lr, log=True)),
              "weight_decay": three(trial.suggest_float("weight_decay", *t.weight_decay, log=True)),
              **{k: trial.suggest_categorical(k, getattr(t, k))
                 for k in ("batch_size", "schedule", "loss", "ema_decay", "augment", "head")}}
    if t.model:
        recipe["model"] = trial.suggest_categorical("model", t.model)
    if recipe["loss"] == "focal":
        recipe["focal_gamma"] = three(trial.suggest_float("focal_gamma", *GAMMAS["focal_gamma"]))
    elif recipe["loss"] == "asl":
        recipe["asl_gamma_neg"] = three(trial.suggest_float("asl_gamma_neg", *GAMMAS["asl_gamma_neg"]))
    return recipe


def current_recipe(p: TrainParams, t: TuneParams) -> dict:
    """The workspace's training recipe by searched name, each value the space holds (the others are
    drawn): the first trial of a new study."""
    values = {"lr": p.lr, "weight_decay": p.weight_decay, "batch_size": p.batch_size, "schedule": p.schedule,
              "loss": p.loss, "ema_decay": p.ema_decay, "augment": p.augment.preset, "head": p.head,
              **({"model": p.model} if t.model else {}),
              **({"focal_gamma": p.focal_gamma} if p.loss == "focal" else {}),
              **({"asl_gamma_neg": p.asl_gamma_neg} if p.loss == "asl" else {})}

    def inside(name: str, value) -> bool:
        space = GAMMAS.get(name) or getattr(t, name)
        return space[0] <= value <= space[1] if name in ("lr", "weight_decay", *GAMMAS) else value in space
    return {name: value for name, value in values.items() if inside(name, value)}


def _put(doc, key: str, value) -> None:
    """Set the dotted params.yaml ``key`` in the mapping ``doc`` (sections made when absent or null)."""
    *parents, last = key.split(".")
    for part in parents:
        if doc.get(part) is None:
            doc[part] = {}
        doc = doc[part]
    doc[last] = value


def with_recipe(raw: dict, recipe: dict) -> dict:
    """params.yaml's mapping with ``recipe`` (searched names) put in at their keys."""
    out = copy.deepcopy(raw)
    for name, value in recipe.items():
        _put(out, KEYS[name], value)
    return out


def trial_layout(ws: Layout, folder: Path) -> Layout:
    """A workspace for one trial: the prepared data linked in, its own model, reports and checkpoint."""
    shutil.rmtree(folder, ignore_errors=True)
    trial = Layout(folder)
    for link, target in ((trial.prepared, ws.prepared), (trial.labels, ws.labels)):
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target.resolve(), target_is_directory=True)
    return trial


def fit(raw: dict, recipe: dict, ws: Layout, folder: Path, trial=None) -> dict:
    """Train ``recipe`` (time budget included) on the train split in ``folder``; with an Optuna
    ``trial``, report each epoch's validation mAP and stop when the pruner says so."""
    import optuna

    from multitag.train import train

    p = parse_params(with_recipe(raw, recipe)).train
    scores = []

    def report(epoch: int, val_map: float) -> None:
        scores.append(val_map)
        if trial is not None:
            trial.report(val_map, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
    try:
        result = train(p, trial_layout(ws, folder), on_epoch=report)
    except optuna.TrialPruned:
        return {"state": "pruned", "val_map": round(max(scores), 4), "epochs": len(scores), "scores": scores}
    best = result.best_val_map
    return {"state": "complete", "val_map": best if best is None else round(best, 4), "epochs": result.epochs_run,
            "scores": scores}


def fit_on_worker(jobs: list[tuple]) -> list[dict]:
    """``fit`` for each (params.yaml mapping, recipe, workspace, trial folder) on a Dask worker: the
    paths are this machine's, which the workers share; no pruning (the study stays on this machine)."""
    from distributed import get_worker

    return [{**fit(raw, recipe, Layout(Path(root)), Path(folder)), "worker": str(get_worker().name)}
            for raw, recipe, root, folder in jobs]


def test_map(ws: Layout, folder: Path) -> float:
    """mAP on the test split of the model a trial left in ``folder``."""
    from multitag.models import load_model_file, predict_scores

    device = select_device("auto")
    x, y, _ = load_split(ws, "test")
    model, meta = load_model_file(Layout(folder).model, device)
    return round(float(mean_ap(y.numpy(), predict_scores(model, x, device, tta=meta["tta"]))), 4)


def data_id(ws: Layout) -> str:
    digest = hashlib.sha256()
    for path in (ws.manifest, ws.targets, ws.vocabulary):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _check_data(ws: Layout) -> None:
    missing = [str(p.relative_to(ws.root)) for p in (ws.manifest, ws.targets, ws.vocabulary) if not p.exists()]
    if missing:
        raise ConfigError(f"tune searches on the prepared data, and {', '.join(missing)} is missing: run "
                          "`multitag run` first (its ingest and labels stages write them)")
    splits = read_manifest(ws, ["split"])["split"].value_counts()
    if not splits.get("val") or not splits.get("train"):
        raise ConfigError(f"tune scores trials on the validation split and trains on the train split; the prepared "
                          f"data has {int(splits.get('train', 0))} train and {int(splits.get('val', 0))} val images "
                          "(ingest.val_fraction)")


def open_study(ws: Layout, t: TuneParams):
    """The workspace's Optuna study of its prepared data (made when absent)."""
    import optuna
    from sqlalchemy.exc import OperationalError

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    folder = ws.root / TUNE
    folder.mkdir(parents=True, exist_ok=True)
    for attempt in range(3):
        try:
            return optuna.create_study(study_name=f"data-{data_id(ws)}", storage=f"sqlite:///{folder / 'study.db'}",
                                       direction="maximize", load_if_exists=True,
                                       # trials drawn before others finish: the liar keeps them apart
                                       sampler=optuna.samplers.TPESampler(seed=t.seed, multivariate=True,
                                                                          constant_liar=t.parallel > 1),
                                       pruner=optuna.pruners.HyperbandPruner(min_resource=1, reduction_factor=3))
        except OperationalError as err:  # another process made the new database's tables at the same moment
            if "already exists" not in str(err) or attempt == 2:
                raise
            time.sleep(0.5)


def _requeue_interrupted(study) -> None:
    """Trials left running by a killed tune: failed, their recipes queued again."""
    import optuna

    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        _requeue(study, trial, "interrupted")


def _requeue(study, trial, note: str) -> None:
    """A running ``trial`` (live or frozen) that did not end: failed with ``note``, its recipe queued again."""
    import optuna

    optuna.Trial(study, trial._trial_id).set_user_attr("note", note)
    study.tell(trial.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
    study.enqueue_trial(trial.params)
    log.info("trial %d was interrupted: failed, its recipe queued again", trial.number)


def describe(recipe: dict) -> str:
    """A recipe in a line (the trial's name in the Prefect UI)."""
    return ", ".join(f"{k} {v}" for k, v in recipe.items() if k != "trial_s")


def one_by_one(jobs: list[tuple]) -> list:
    """Each (name, work): work's outcome, or the exception it raised."""
    outcomes = []
    for _, work in jobs:
        try:
            outcomes.append(work())
        except Exception as err:  # recorded by the caller: the search goes on
            outcomes.append(err)
    return outcomes


def tune(ws: Layout, budget: str | None = None, resume: bool = False, max_trials: int | None = None,
         run_trials=None, on_trial=None) -> Tuning:
    """Search the recipe (module docstring). ``run_trials([(name, work), ...])`` runs trials'
    training, ``tune.parallel`` at once, and returns each outcome or the exception it raised (the
    flow makes each a Prefect task); ``on_trial(tuning)`` is called after each trial."""
    from multitag.compute import executor, map_chunks

    start = time.time()
    run_trials = run_trials or one_by_one
    params = load_params(ws.params)
    raw, t = yaml.safe_load(ws.params.read_text()), params.tune
    _check_data(ws)
    study = open_study(ws, t)
    _requeue_interrupted(study)
    if resume:
        total = study.user_attrs.get("budget_left_s", 0)
        if total < 60:
            raise ConfigError(f"nothing to resume: the last tune of this data left {total:.0f} s of its budget; run "
                              "`multitag tune` without --resume to spend a new budget on the same study")
        trial_s = study.user_attrs["trial_s"]
    else:
        try:
            total = duration_s(budget or t.budget)
        except ValueError as err:
            raise ConfigError(f"tune --budget: {err}") from None
        # the study keeps the trial length it began with (its trials stay comparable), unless tune.trial_s says
        trial_s = t.trial_s or study.user_attrs.get("trial_s") or max(60.0, total / 6)
        if total < trial_s and max_trials != 0:
            raise ConfigError(f"tune --budget: {total:.0f} s is less than one trial (tune.trial_s {trial_s:.0f} s)")
        study.set_user_attr("trial_s", trial_s)
    deadline, folder = start + total, ws.root / TUNE / study.study_name
    before = study.user_attrs.get("spent_s", 0.0)

    def account() -> None:
        study.set_user_attr("budget_left_s", max(0.0, deadline - time.time()))
        study.set_user_attr("spent_s", before + time.time() - start)

    with executor(params.compute) if t.parallel > 1 else contextlib.nullcontext() as cluster:
        def work(recipe: dict, where: Path, trial=None):
            """One trial's training: here (pruned by ``trial``), or as a task on the cluster, where the
            baseline trains too (a recipe and its baseline on the same kind of machine)."""
            if cluster is None:
                return lambda: fit(raw, recipe, ws, where, trial)
            job = [(raw, recipe, str(ws.root.resolve()), str(where.resolve()))]
            return lambda: next(map_chunks(fit_on_worker, job, cluster, 1, params.compute))[0]

        if BASELINE not in study.user_attrs:
            baseline = {"recipe": {}}
            [outcome] = run_trials([("baseline: the workspace's recipe as `multitag run` trains it",
                                     work({}, folder / BASELINE))])
            if isinstance(outcome, ComputeError):  # the cluster, not the recipe: nothing recorded
                raise outcome
            if isinstance(outcome, Exception):  # the user's own recipe failing is worth saying; the search goes on
                log.warning("the workspace's recipe failed on this data: %s", outcome)
                baseline.update(state="fail", note=str(outcome)[:300])
            else:
                baseline.update({k: v for k, v in outcome.items() if k != "scores"})
            study.set_user_attr(BASELINE, baseline)
            account()
        if not study.trials:  # the workspace's recipe at the trial's time first: does training longer pay?
            study.enqueue_trial(current_recipe(params.train, t))
        done = 0
        while deadline - time.time() >= trial_s and (max_trials is None or done < max_trials):
            batch = []
            for _ in range(t.parallel if max_trials is None else min(t.parallel, max_trials - done)):
                trial = study.ask()
                recipe = {**suggest(trial, t), "trial_s": trial_s}
                trial.set_user_attr("recipe", recipe)
                batch.append((trial, f"trial {trial.number}: {describe(recipe)}",
                              work(recipe, folder / f"trial-{trial.number:03d}", trial)))
            outcomes = run_trials([(name, job) for _, name, job in batch])
            for (trial, _, _), outcome in zip(batch, outcomes):
                _record(study, trial, outcome, round(before + time.time() - start, 1))
            _keep_best_model(study, folder)
            done += len(batch)
            account()
            lost = next((o for o in outcomes if isinstance(o, ComputeError)), None)
            if lost:  # the cluster went away: the trials it held are failed, their recipes queued for --resume
                raise lost
            if on_trial:
                on_trial(summarise(study, ws, folder, start, t.min_gain, final=False))
    return summarise(study, ws, folder, start, t.min_gain, final=True)


def _record(study, trial, outcome, finished_s: float) -> None:
    """A trial's outcome (or the exception its training raised) told to the study."""
    import optuna

    if isinstance(outcome, ComputeError):  # not the recipe's fault: tried again by the next tune
        _requeue(study, trial, "interrupted: " + str(outcome)[:280])
        return
    if isinstance(outcome, Exception):  # nan loss, out of memory, a recipe the data cannot take
        log.warning("trial %d failed: %s", trial.number, outcome)
        trial.set_user_attr("note", str(outcome)[:300])
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return
    trial.set_user_attr("epochs", outcome["epochs"])
    trial.set_user_attr("finished_s", finished_s)
    if "worker" in outcome:  # trained on the cluster: its epochs told now (nothing was pruned)
        trial.set_user_attr("worker", outcome["worker"])
        for epoch, score in enumerate(outcome["scores"], 1):
            trial.report(score, epoch)
    if outcome["state"] == "pruned":
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    elif outcome["val_map"] is None or math.isnan(outcome["val_map"]):
        trial.set_user_attr("note", "no validation mAP (no label has a positive in the val split)")
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    else:
        study.tell(trial, outcome["val_map"])


def _keep_best_model(study, folder: Path) -> None:
    """Only the best finished trial's model (and the baseline's) stay on disk."""
    best = best_trial(study)
    keep = {BASELINE, f"trial-{best.number:03d}" if best else None}
    for path in folder.glob("trial-*"):
        if path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)


def best_trial(study):
    """The finished trial with the highest validation mAP (the earliest of equals), or None."""
    import optuna

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return max(done, key=lambda tr: (tr.value, -tr.number)) if done else None


def summarise(study, ws: Layout, folder: Path, start: float, min_gain: float, final: bool) -> Tuning:
    """The study as a Tuning; with ``final``, the test split scored for the best trial and the
    baseline (once each), the importances, and the params.yaml diff when the best trial's val mAP
    beats the baseline's by ``min_gain`` or more."""
    import optuna

    trials = [{"number": tr.number, "state": tr.state.name.lower(), "val_map": tr.value,
               "recipe": tr.user_attrs.get("recipe", tr.params),
               "epochs": tr.user_attrs.get("epochs"), "finished_s": tr.user_attrs.get("finished_s"),
               "note": tr.user_attrs.get("note", ""),
               "last_val_map": max(tr.intermediate_values.values()) if tr.intermediate_values else None}
              for tr in study.get_trials(deepcopy=False)]
    baseline = dict(study.user_attrs.get(BASELINE, {}))
    best = best_trial(study)
    best = next(tr for tr in trials if tr["number"] == best.number) if best else None
    diff, recipe, importances = "", {}, {}
    if final:
        if baseline.get("state") == "complete" and (folder / BASELINE).exists():
            baseline["test_map"] = test_map(ws, folder / BASELINE)
        if best:
            best = {**best, "test_map": test_map(ws, folder / f"trial-{best['number']:03d}")}
            if best["val_map"] >= (baseline.get("val_map") or float("-inf")) + min_gain:
                recipe = {KEYS[k]: v for k, v in best["recipe"].items()}
                diff = params_diff(ws.params, recipe)
        if sum(tr["state"] == "complete" for tr in trials) >= 3:  # fewer say nothing
            importances = {k: round(v, 3) for k, v in optuna.importance.get_param_importances(study).items()}
    return Tuning(study.study_name, trials, baseline, best, diff, recipe, importances, round(time.time() - start, 1))


def _edited(path: Path, recipe: dict) -> str:
    """params.yaml's text with ``recipe`` (params.yaml keys) set, its comments and order kept."""
    from ruamel.yaml import YAML

    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    doc = rt.load(path.read_text())
    for key, value in recipe.items():
        _put(doc, key, value)
    out = io.StringIO()
    rt.dump(doc, out)
    return out.getvalue()


def params_diff(path: Path, recipe: dict) -> str:
    """A unified diff of params.yaml changed to ``recipe``."""
    before, after = path.read_text(), _edited(path, recipe)
    return "".join(difflib.unified_diff(before.splitlines(keepends=True), after.splitlines(keepends=True),
                                        "params.yaml", "params.yaml (tuned)"))


def apply(path: Path, recipe: dict) -> None:
    """Write ``recipe`` into params.yaml (`multitag tune --apply`: the user's own command)."""
    text = _edited(path, recipe)
    parse_params(yaml.safe_load(text), str(path))
    write_atomic(path, text)
