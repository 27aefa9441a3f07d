"""Optuna sweeps: two worker processes share one study on RDB storage; every trial is a nested MLflow run with
its params, intermediate values, value and state (pruned and failed trials included)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from conftest import REPO

WORKER = """
import sys, optuna
from distillery.platform import sweeps, tracking

def objective(trial):
    x = trial.suggest_float("x", -5, 5)
    for step in range(3):
        trial.report((x - 2) ** 2 + 1.0 / (step + 1), step)
        if trial.should_prune():
            raise optuna.TrialPruned()
    return (x - 2) ** 2

seed = int(sys.argv[1])
with tracking.step_run("demo", f"sweep-worker-{seed}", kfp_run_id="kfp-sweep"):
    out = sweeps.run_worker("demo-study", objective, n_trials=5, pipeline="demo", sampler_seed=seed)
print(out)
"""


def _trials(c, exp):
    return [r for r in c.search_runs([exp], max_results=500) if r.data.tags.get("distillery.role") == "trial"]


@pytest.mark.slow
def test_parallel_workers_share_one_study_with_nested_trial_runs(home):
    import optuna

    from distillery.platform import sweeps, tracking

    # As in a pipeline: one step creates the study (and the tracking store) before the workers fan out.
    tracking.experiment_for("demo")
    sweeps.create_study("demo-study")
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(seed)], cwd=REPO, env=dict(os.environ),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for seed in (1, 2)]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]

    study = optuna.load_study(study_name="demo-study", storage=sweeps.storage())
    assert len(study.trials) == 10
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)
    best = sweeps.best_params("demo-study")
    assert best == study.best_params and abs(best["x"] - 2) < 3

    c = tracking.client()
    exp = tracking.experiment_for("demo")
    workers = {r.data.tags["task"]: r for r in c.search_runs([exp]) if r.data.tags.get("distillery.role") == "step"}
    assert set(workers) == {"sweep-worker-1", "sweep-worker-2"}
    # Both workers found the same parent run for their KFP run.
    assert len({w.data.tags["mlflow.parentRunId"] for w in workers.values()}) == 1
    trials = _trials(c, exp)
    assert len(trials) == 10
    worker_ids = {w.info.run_id for w in workers.values()}
    assert all(t.data.tags["mlflow.parentRunId"] in worker_ids for t in trials)
    assert all(t.data.tags["kfp_run_id"] == "kfp-sweep" for t in trials)
    by_number = {int(t.data.tags["optuna.trial"]): t for t in trials}
    assert sorted(by_number) == list(range(10))
    for ft in study.trials:
        run = by_number[ft.number]
        assert ft.user_attrs["mlflow_run_id"] == run.info.run_id
        assert run.data.tags["optuna.state"] == ft.state.name and run.info.status == "FINISHED"
        assert float(run.data.params["x"]) == pytest.approx(ft.params["x"])
        history = c.get_metric_history(run.info.run_id, "intermediate_value")
        assert {m.step: m.value for m in history} == pytest.approx(ft.intermediate_values)
        if ft.state.name == "COMPLETE":
            assert run.data.metrics["objective"] == pytest.approx(ft.value)


def test_pruned_failed_and_nan_trials_are_recorded(home):
    import mlflow
    import optuna

    from distillery.platform import sweeps, tracking

    parent = tracking.start_pipeline_run("demo", {})

    def objective(trial):
        x = trial.suggest_int("x", 0, 10)
        mlflow.log_metric("own_metric", x)  # the objective logs into its trial's run
        trial.report(float(x), 0)
        if trial.number == 1:
            raise optuna.TrialPruned()
        if trial.number == 2:
            return math.nan  # Optuna marks it FAIL
        if trial.number == 3:
            raise RuntimeError("diverged")
        return float(x)

    with pytest.raises(RuntimeError, match="diverged"):
        sweeps.run_worker("s", objective, n_trials=5, pipeline="demo", parent_run_id=parent)
    assert mlflow.active_run() is None  # the failed trial's run was ended
    out = sweeps.run_worker("s", lambda t: float(t.suggest_int("x", 0, 10)), n_trials=1, pipeline="demo",
                            parent_run_id=parent)
    assert out["trials"] == 5 and out["finished_here"] == 1

    c = tracking.client()
    runs = {int(r.data.tags["optuna.trial"]): r for r in _trials(c, tracking.experiment_for("demo"))}
    assert sorted(runs) == [0, 1, 2, 3, 4]
    assert all(r.data.tags["mlflow.parentRunId"] == parent for r in runs.values())
    states = {n: (r.data.tags["optuna.state"], r.info.status) for n, r in runs.items()}
    assert states == {0: ("COMPLETE", "FINISHED"), 1: ("PRUNED", "FINISHED"), 2: ("FAIL", "FAILED"),
                      3: ("FAIL", "FAILED"), 4: ("COMPLETE", "FINISHED")}
    assert runs[3].data.tags["error"] == "RuntimeError: diverged"
    assert "objective" in runs[0].data.metrics and "objective" not in runs[1].data.metrics
    assert runs[1].data.metrics["intermediate_value"] == float(runs[1].data.params["x"])
    assert all("own_metric" in runs[n].data.metrics for n in range(4))
    assert sweeps.best_params("s")["x"] in (int(runs[0].data.params["x"]), int(runs[4].data.params["x"]))


def test_clear_errors(home):
    from distillery.platform import sweeps

    with pytest.raises(ValueError, match="direction must be one of"):
        sweeps.create_study("a", "down")
    sweeps.create_study("a", "maximize")
    with pytest.raises(ValueError, match="already exists with direction maximize"):
        sweeps.create_study("a", "minimize")
    with pytest.raises(LookupError, match="no completed trial"):
        sweeps.best_params("a")
    with pytest.raises(LookupError, match="no Optuna study named 'b'"):
        sweeps.best_params("b")
    with pytest.raises(ValueError, match="needs an active step run"):
        sweeps.run_worker("a", lambda t: 0.0, n_trials=1, direction="maximize")


def test_a_postgresql_url_without_a_driver_gets_the_shipped_one():
    from distillery.platform.sweeps import with_driver

    # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, which the project does not ship.
    assert with_driver("postgresql://u:p@db:5432/optuna") == "postgresql+psycopg2://u:p@db:5432/optuna"
    for kept in ("postgresql+psycopg2://u:p@db/optuna", "sqlite:///x.db", "mysql://u@h/d"):
        assert with_driver(kept) == kept
