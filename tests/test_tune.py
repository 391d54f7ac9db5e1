"""`multitag tune` on tiny data: the flow on a real Prefect server (a task per trial, the study
artifact, pruning, the test split read only after the search), Ctrl-C and --resume without repeating
finished trials, a failing trial, --apply, and the refusals."""

import os
import signal
import subprocess
import time

import optuna
import pytest
import yaml
from prefect.settings import PREFECT_API_URL, temporary_settings

import multitag.train
from multitag.config import load_params
from multitag.errors import ConfigError
from multitag.layout import TUNE, Layout
from multitag.tune import KEYS, apply, open_study, tune
from tests.conftest import BIN, ROOT, prefect_api, run, tiny_data, tiny_params


def workspace(root, **tune_section) -> Layout:
    """Prepared tiny data (as `multitag run` leaves it) and a params.yaml with 10 s trials."""
    ws = tiny_data(root)
    p = tiny_params()
    p["tune"].update({"trial_s": 10, **tune_section})
    ws.params.write_text(yaml.safe_dump(p, sort_keys=False))
    return ws


def test_tune_flow_runs_trials_as_tasks_and_reads_the_test_split_only_at_the_end(prefect_server, tmp_path,
                                                                                 monkeypatch):
    from flows.tune import tune_flow

    ws = workspace(tmp_path / "ws")
    splits = []
    load_split = multitag.train.load_split
    monkeypatch.setattr(multitag.train, "load_split", lambda layout, split, **kw: splits.append(split)
                        or load_split(layout, split, **kw))
    with temporary_settings({PREFECT_API_URL: prefect_server}):
        result = tune_flow(workdir=str(ws.root), budget="5m", max_trials=2)
    assert "test" not in splits and {"train", "val"} <= set(splits)  # the trials read train and val only
    assert [t["state"] for t in result["trials"]].count("fail") == 0
    assert len(result["trials"]) == 2 and result["baseline"]["state"] == "complete"
    study = open_study(ws, load_params(ws.params).tune)
    assert isinstance(study.pruner, optuna.pruners.HyperbandPruner)
    assert all(t.intermediate_values for t in study.trials)  # every epoch reported to the pruner
    best = result["best"]
    assert best["test_map"] is not None and result["baseline"]["test_map"] is not None  # scored after the search
    assert best["recipe"]["trial_s"] == 10 and set(best["recipe"]) <= set(KEYS)
    params = load_params(ws.params)
    assert bool(result["diff"]) == (best["val_map"] >= result["baseline"]["val_map"] + params.tune.min_gain)
    # the baseline: the recipe as `multitag run` trains it (1 epoch); trial 0: the same recipe for the trial's 10 s
    p = params.train
    assert result["baseline"]["epochs"] == p.epochs == 1 and result["trials"][0]["epochs"] > 1
    assert {k: v for k, v in result["trials"][0]["recipe"].items() if k not in ("batch_size", "trial_s")} == {
        "lr": p.lr, "weight_decay": p.weight_decay, "schedule": p.schedule, "loss": p.loss,
        "ema_decay": p.ema_decay, "augment": p.augment.preset, "head": p.head}
    # the models of the baseline and the best trial stay; the others' are removed
    kept = sorted(p.name for p in (ws.root / TUNE / result["study"]).iterdir())
    assert kept == ["baseline", f"trial-{best['number']:03d}"]

    [flow_run] = prefect_api(prefect_server, "/flow_runs/filter", {"flow_runs": {"name": {"like_": "tune ws:"}}})
    names = sorted(t["name"] for t in prefect_api(prefect_server, "/task_runs/filter",
                                           {"flow_runs": {"id": {"any_": [flow_run["id"]]}}}))
    assert names[0] == "baseline: the workspace's recipe as `multitag run` trains it"
    assert [n.split(":")[0] for n in names[1:]] == ["trial 0", "trial 1"] and "lr " in names[1]
    versions = sorted(prefect_api(prefect_server, "/artifacts/filter", {"artifacts": {
        "key": {"any_": ["tune-study"]}, "flow_run_id": {"any_": [flow_run["id"]]}}}), key=lambda a: a["created"])
    assert len(versions) == 3  # updated after each trial, and at the end
    assert "### Trials" in versions[-1]["data"] and "data:image/png;base64," in versions[-1]["data"]
    assert "test mAP (scored once, at the end)" in versions[-1]["data"]


def test_ctrl_c_then_resume_repeats_no_finished_trial(prefect_server, tmp_path):
    ws = workspace(tmp_path / "ws")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PREFECT_API_URL": prefect_server}
    proc = subprocess.Popen([str(BIN / "multitag"), "tune", "--budget", "10m"], cwd=ws.root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    db = ws.root / TUNE / "study.db"
    deadline = time.time() + 300

    def states():
        """The trials' states; a running trial counts once its whole recipe is drawn (it is training)."""
        if not db.exists():
            return []
        study = open_study(ws, load_params(ws.params).tune)
        return [t.state for t in study.get_trials(deepcopy=False)
                if t.state != optuna.trial.TrialState.RUNNING or "recipe" in t.user_attrs]
    while not (optuna.trial.TrialState.COMPLETE in states() and optuna.trial.TrialState.RUNNING in states()):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "multitag tune --resume" in out, out
    study = open_study(ws, load_params(ws.params).tune)
    finished = {t.number: (t.value, t.params) for t in study.trials if t.state.is_finished()}
    interrupted = [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    assert len(interrupted) == 1

    resumed = run([str(BIN / "multitag"), "tune", "--resume", "--trials", "1"], ws.root, env=env)
    assert "study data-" in resumed.stdout
    study = open_study(ws, load_params(ws.params).tune)
    assert {t.number: (t.value, t.params) for t in study.trials if t.number in finished} == finished
    again = study.trials[interrupted[0].number]
    assert again.state == optuna.trial.TrialState.FAIL and again.user_attrs["note"] == "interrupted"
    [new] = study.trials[len(finished) + 1:]  # one trial more: the interrupted recipe, queued again
    assert new.params == interrupted[0].params and new.state.is_finished()
    assert study.user_attrs["baseline"]["state"] == "complete"  # trained once, not again


def test_a_failing_trial_is_recorded_and_the_search_goes_on(tmp_path):
    # a learning rate this high drives the outputs to non-finite values: train raises, the trial fails
    ws = workspace(tmp_path / "ws", lr=[1e6, 1e7], loss=["bce"])
    result = tune(ws, "3m", max_trials=2)
    assert [t["state"] for t in result.trials] == ["fail", "fail"]
    assert all("non-finite" in t["note"] or "the loss became nan" in t["note"] for t in result.trials)
    assert result.best is None and result.diff == "" and result.baseline["state"] == "complete"


def test_apply_writes_only_the_tuned_keys_and_keeps_the_comments(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    before = yaml.safe_load(params.read_text())
    recipe = {"train.lr": 0.00123, "train.augment.preset": "none", "train.time_budget_s": 120.0, "train.loss": "asl"}
    apply(params, recipe)
    after = yaml.safe_load(params.read_text())
    for key, value in recipe.items():
        *parents, last = key.split(".")
        a, b = after, before
        for part in parents:
            a, b = a[part], b[part]
        assert a.pop(last) == value
        b.pop(last)
    assert after == before
    assert "# Any torchvision classification model by name" in params.read_text()  # comments kept
    load_params(params)


def test_refusals_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="multitag run"):  # no prepared data yet
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty/params.yaml").write_text(yaml.safe_dump(tiny_params()))
        tune(Layout(tmp_path / "empty"), "5m")
    ws = workspace(tmp_path / "ws")
    with pytest.raises(ConfigError, match="not a duration"):
        tune(ws, "20x")
    with pytest.raises(ConfigError, match="less than one trial"):
        tune(workspace(tmp_path / "ws2", trial_s=600), "5m")
    with pytest.raises(ConfigError, match="nothing to resume"):
        tune(ws, resume=True)
    with pytest.raises(ConfigError, match=r"tune.lr: must be \[low, high\]"):  # an invalid space
        tune(workspace(tmp_path / "ws3", lr=[0.1, 0.01]), "5m")
    with pytest.raises(ConfigError, match=r"tune.parallel 2 .* compute.dask is null: set it to local:2"):
        tune(workspace(tmp_path / "ws4", parallel=2), "5m")
