"""Faults with the real servers: the object store stopped while `register` uploads, the MLflow server restarted
mid-pipeline, PostgreSQL restarted during a sweep. Shared servers are brought back in `finally`; the servers a
test restarts on purpose are its own."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO
from integration import services

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _model_folder(root: Path, n: int = 5) -> dict[str, bytes]:
    files = {"model_index.json": b'{"_class_name": "Demo"}',
             **{f"unet/part-{i}.safetensors": os.urandom(200_000) for i in range(n - 1)}}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_object_store_stopped_while_register_uploads(production, monkeypatch, s3, tmp_path):
    """The gateway dies after two of five files: the step fails saying so and no version exists; with the object
    store back the retried step registers a complete version."""
    from mlflow.store.artifact.s3_artifact_repo import S3ArtifactRepository

    from distillery.platform import registry, tracking
    from distillery.platform.stepping import run_step
    from distillery.settings import get_settings
    from distillery.steps import release

    name, pipeline = "itest-faulty", "itest-faults"
    files = _model_folder(tmp_path / "model")
    parent = tracking.start_pipeline_run(pipeline, {})
    monkeypatch.setenv("DISTILLERY_PARENT_RUN_ID", parent)
    get_settings.cache_clear()

    upload, uploaded = S3ArtifactRepository._upload_file, []

    def upload_then_stop_the_store(self, s3_client, local_file, bucket, key):
        upload(self, s3_client, local_file, bucket, key)
        uploaded.append(key)
        if len(uploaded) == 2:
            s3.server.stop_gateway()

    monkeypatch.setattr(S3ArtifactRepository, "_upload_file", upload_then_stop_the_store)
    try:
        with pytest.raises(registry.RegistryError, match=f"no version of '{name}' was created") as failed:
            run_step(release.register, pipeline=pipeline, step="register", model_dir=str(tmp_path / "model"),
                     metrics={"fd": 1.5}, model_name=name)
    finally:
        if not s3.server.procs:
            s3.server.start_gateway()
    assert "artifact store is reachable" in str(failed.value) and len(uploaded) == 2
    c = tracking.client()
    assert c.search_model_versions(f"name='{name}'") == []
    steps = c.search_runs([tracking.experiment_for(pipeline)], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert [(r.info.status, "no version" in r.data.tags["error"]) for r in steps] == [("FAILED", True)]

    monkeypatch.setattr(S3ArtifactRepository, "_upload_file", upload)
    result = run_step(release.register, pipeline=pipeline, step="register", model_dir=str(tmp_path / "model"),
                      metrics={"fd": 1.5}, model_name=name)
    tracking.finish_pipeline_run(parent)
    assert result["version"] == "1"
    assert [v.version for v in c.search_model_versions(f"name='{name}'")] == ["1"]
    assert _tree(registry.download(name, "champion", dst=tmp_path / "back")) == files


def _down(url: str) -> bool:
    try:
        urllib.request.urlopen(f"{url}/health", timeout=1)
        return False
    except OSError:
        return True


def test_mlflow_server_restarted_mid_pipeline(production, monkeypatch, mlflow_server):
    """A step logs while the tracking server restarts: the call waits (bounded retries with backoff) and goes
    through, the next step runs against the restarted server, and the pipeline run finishes."""
    from distillery.platform import tracking
    from distillery.platform.stepping import run_step
    from distillery.settings import get_settings

    server = mlflow_server.server
    pipeline = "itest-restart"
    parent = tracking.start_pipeline_run(pipeline, {"steps": 2})
    monkeypatch.setenv("DISTILLERY_PARENT_RUN_ID", parent)
    get_settings.cache_clear()

    def train() -> dict:
        tracking.log_metrics({"loss": 1.0}, step=0)
        restart = threading.Thread(target=server.restart, kwargs={"down_s": 2.0})
        restart.start()
        deadline = time.time() + 30
        while not _down(server.url) and time.time() < deadline:
            time.sleep(0.05)
        assert _down(server.url), "the server did not go down"
        start = time.time()
        tracking.log_metrics({"loss": 0.5}, step=1)  # sent while the server is down
        waited = time.time() - start
        restart.join()
        return {"waited_s": waited}

    try:
        out = run_step(train, pipeline=pipeline, step="train")
    finally:  # the session's server stays up for the tests after this one
        if _down(server.url):
            server.restart()
    assert out["waited_s"] > 1.5, out  # the call did wait for the restarted server
    run_step(lambda: {"fd": 2.0}, pipeline=pipeline, step="evaluate")
    tracking.finish_pipeline_run(parent)

    c = tracking.client()
    assert c.get_run(parent).info.status == "FINISHED"
    steps = {r.info.run_name: r for r in c.search_runs([tracking.experiment_for(pipeline)],
                                                       f"tags.`mlflow.parentRunId` = '{parent}'")}
    assert {k: r.info.status for k, r in steps.items()} == {"train": "FINISHED", "evaluate": "FINISHED"}
    history = c.get_metric_history(steps["train"].info.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 1.0), (1, 0.5)]
    assert steps["evaluate"].data.metrics["fd"] == 2.0


# Trial 2 stops before its second report until the test has stopped PostgreSQL: the report is then sent while
# the database is down, whatever the machine's speed (waiting for "two trials complete" raced on a slow machine).
SWEEP_WORKER = """
import os, pathlib, time
import optuna
from distillery.platform import sweeps

mid, go = pathlib.Path(os.environ["SWEEP_MID"]), pathlib.Path(os.environ["SWEEP_GO"])

def objective(trial):
    x = trial.suggest_float("x", -3, 3)
    for step in range(4):
        time.sleep(0.25)
        if trial.number == 2 and step == 1:
            mid.touch()
            while not go.exists():
                time.sleep(0.05)
        trial.report((x - 1) ** 2 + 4 - step, step)
    return (x - 1) ** 2

out = sweeps.run_worker("restart-study", objective, n_trials=6, pipeline="itest-pg-restart", sampler_seed=3,
                        pruner=optuna.pruners.NopPruner())
print("finished_here", out["finished_here"], "trials", out["trials"], flush=True)
"""


def test_postgres_restarted_during_a_sweep(home, tmp_path):
    """PostgreSQL restarts (connections cut, down 3 s) while a worker is mid-sweep: the worker waits for it,
    and the study ends with exactly the trials asked for, each once, all complete."""
    import optuna

    from distillery.platform import sweeps, tracking

    pg = services.start_postgres()  # its own: a restart must not touch the session's MLflow backend
    try:
        url = pg.create_database("optuna")
        mid, go = tmp_path / "mid", tmp_path / "go"
        env = {**os.environ, "DISTILLERY_OPTUNA_STORAGE": url, "PYTHONPATH": str(REPO / "src"),
               "SWEEP_MID": str(mid), "SWEEP_GO": str(go)}
        log = tmp_path / "worker.log"
        with log.open("w") as sink:
            worker = subprocess.Popen([sys.executable, "-c", SWEEP_WORKER], cwd=REPO, env=env, stdout=sink,
                                      stderr=subprocess.STDOUT)
            try:
                deadline = time.time() + 180
                while worker.poll() is None and not mid.exists() and time.time() < deadline:
                    time.sleep(0.05)
                assert mid.exists() and worker.poll() is None, log.read_text()[-3000:]
                pg.pg_ctl("stop")  # connections cut; the worker's next report meets a stopped database
                go.touch()
                time.sleep(3.0)
                pg.pg_ctl("start")
                worker.wait(240)
            finally:
                if worker.poll() is None:
                    worker.kill()
                    worker.wait(10)
        out = log.read_text()
        assert worker.returncode == 0, out[-3000:]
        assert "finished_here 6 trials 6" in out, out[-3000:]
        assert "lost its database connection" in out, "the restart did not hit the worker mid-sweep"

        study = optuna.load_study(study_name="restart-study", storage=sweeps.storage(url))
        assert sorted(t.number for t in study.trials) == list(range(6))
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
        assert all(sorted(t.intermediate_values) == [0, 1, 2, 3] for t in study.trials)
        assert len({t.params["x"] for t in study.trials}) == 6
        runs = tracking.client().search_runs([tracking.experiment_for("itest-pg-restart")])
        assert sorted(int(r.data.tags["optuna.trial"]) for r in runs) == list(range(6))
        assert all(r.data.tags["optuna.state"] == "COMPLETE" for r in runs)
    finally:
        pg.stop()
