"""Optuna on PostgreSQL: worker processes share one study by name, each trial tracked on the MLflow server."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.integration

WORKER = """
import sys
from distillery.platform import sweeps

out = sweeps.run_worker("pg-study", lambda t: (t.suggest_float("x", -3, 3) - 1) ** 2 + t.suggest_int("k", 0, 3),
                        n_trials=4, pipeline="itest-sweep", parent_run_id=sys.argv[2], sampler_seed=int(sys.argv[1]))
assert out["finished_here"] == 4, out
"""


def test_two_workers_share_a_study_on_postgres(production, monkeypatch, postgres_server, tmp_path):
    import optuna

    from distillery.platform import sweeps, tracking
    from distillery.settings import get_settings

    url = postgres_server.create_database("optuna")
    monkeypatch.setenv("DISTILLERY_OPTUNA_STORAGE", url)
    get_settings.cache_clear()
    assert get_settings().optuna_storage_url == url
    sweeps.create_study("pg-study")
    parent = tracking.start_pipeline_run("itest-sweep", {"n_workers": 2})
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(seed), parent], cwd=REPO, env=dict(os.environ),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for seed in (1, 2)]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    tracking.finish_pipeline_run(parent)

    study = optuna.load_study(study_name="pg-study", storage=sweeps.storage())
    assert len(study.trials) == 8
    assert sorted(t.number for t in study.trials) == list(range(8))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    best = sweeps.best_params("pg-study")
    assert set(best) == {"x", "k"} and best == study.best_params

    # The trials are rows in PostgreSQL, not in some local file.
    import psycopg2
    from sqlalchemy.engine import make_url

    u = make_url(url)
    with psycopg2.connect(host=u.host, port=u.port, user=u.username, password=u.password, dbname=u.database) as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM trials t JOIN studies s ON s.study_id = t.study_id "
                        "WHERE s.study_name = 'pg-study' AND t.state = 'COMPLETE'")
            assert cur.fetchone() == (8,)

    # Each trial is an MLflow run nested under the sweep's parent run.
    runs = tracking.client().search_runs([tracking.experiment_for("itest-sweep")],
                                         filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(int(r.data.tags["optuna.trial"]) for r in runs) == list(range(8))
    assert all(r.data.tags["optuna.state"] == "COMPLETE" for r in runs)


PRUNED_WORKER = """
import sys, optuna
from distillery.platform import sweeps

schedule = sweeps.rungs(27, 3)

def objective(trial):
    x = trial.suggest_float("x", -4, 4)
    for steps in schedule:
        trial.report((x - 1) ** 2 + 3.0 / steps, steps)
        if steps < schedule[-1] and trial.should_prune():
            raise optuna.TrialPruned()
    return (x - 1) ** 2

out = sweeps.run_worker("pg-sha", objective, n_trials=6, pipeline="itest-sweep", parent_run_id=sys.argv[2],
                        sampler_seed=int(sys.argv[1]), pruner=sweeps.successive_halving(schedule[0]))
print(out)
"""


def test_successive_halving_prunes_across_worker_processes_on_postgres(production, monkeypatch, postgres_server):
    """The rungs' values are rows in PostgreSQL: each worker prunes against the other's trials too."""
    import optuna

    from distillery.platform import sweeps, tracking
    from distillery.settings import get_settings

    url = postgres_server.create_database("optuna_sha")
    monkeypatch.setenv("DISTILLERY_OPTUNA_STORAGE", url)
    get_settings.cache_clear()
    sweeps.create_study("pg-sha", pruner=sweeps.successive_halving(3))
    parent = tracking.start_pipeline_run("itest-sweep", {"n_workers": 2})
    procs = [subprocess.Popen([sys.executable, "-c", PRUNED_WORKER, str(seed), parent], cwd=REPO, env=dict(os.environ),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for seed in (1, 2)]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    tracking.finish_pipeline_run(parent)

    study = optuna.load_study(study_name="pg-sha", storage=sweeps.storage())
    states = [t.state.name for t in study.trials]
    assert len(states) == 12 and states.count("PRUNED") >= 3 and "COMPLETE" in states
    assert all(t.last_step == 27 for t in study.trials if t.state.name == "COMPLETE")
    # Rung values written by one worker were read by the other: both workers' trials reached rung 0.
    rung0 = [t for t in study.trials if "completed_rung_0" in t.system_attrs]
    assert len(rung0) == 12
    # a pruned trial lost to a trial of either worker that reached the same rung
    for t in study.trials:
        if t.state.name == "PRUNED":
            step = t.last_step
            assert any(o.intermediate_values.get(step, float("inf")) < t.intermediate_values[step]
                       for o in study.trials if o.number != t.number)
