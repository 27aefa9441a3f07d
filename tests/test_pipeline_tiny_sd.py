"""The tiny-sd smoke DAG end to end through the KFP local runner, and what it leaves behind. The compiled YAML
loaded back and run is tests/integration/test_pipelines_in_containers.py (every step in its own container)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

STEPS = {"data", "validate", "feature-net", "train-vae", "train-unet", "evaluate", "gate", "register", "deploy"}


def _env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILLERY_")}
    env.update(DISTILLERY_HOME=str(home), DISTILLERY_DATA_DIR=str(REPO / "data"), PYTHONUNBUFFERED="1")
    return env


def _cli(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "distillery.cli", *args], cwd=REPO, env=_env(home),
                          capture_output=True, text=True, timeout=2700)
    if check and proc.returncode != 0:
        pytest.fail(f"distillery {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-6000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One real smoke run through `distillery run` (with step caching on, so later runs can reuse it)."""
    home = tmp_path_factory.mktemp("smoke") / "home"
    proc = _cli(home, "run", "tiny-sd", "--profile", "smoke", "--cache")
    return home, proc


def _mlflow(home: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")


def _runs(client, experiment="distillery/tiny-sd"):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=500)


def test_smoke_run_registers_a_champion_with_tracked_steps(smoke):
    home, proc = smoke
    assert "registered" in proc.stdout and "distillery serve tiny-sd" in proc.stdout
    client = _mlflow(home)
    runs = _runs(client)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = {r.data.tags["task"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == STEPS
    for step, run in children.items():
        assert run.info.status == "FINISHED", step
        assert run.data.tags["pipeline"] == "tiny-sd"
        assert run.data.tags["kfp_run_id"] and run.data.tags["git_commit"]
    assert children["data"].data.tags.get("data_revision")

    ev = children["evaluate"].data.metrics
    assert math.isfinite(ev["fd"]) and ev["fd"] >= 0
    assert 0.0 <= ev["cond_acc"] <= 1.0
    artifacts = {a.path for a in client.list_artifacts(children["evaluate"].info.run_id)}
    assert any(p.endswith(".png") for p in artifacts), artifacts
    report = {a.path for a in client.list_artifacts(children["validate"].info.run_id)}
    assert any(p.endswith(".html") for p in report), report
    deploy = {a.path for a in client.list_artifacts(children["deploy"].info.run_id)}
    assert "inferenceservice.yaml" in deploy

    mv = client.get_model_version_by_alias("tiny-sd", "champion")
    assert str(mv.version) == "1"
    assert mv.tags["parent_run_id"] == parent.info.run_id


def test_registered_champion_loads_in_a_fresh_process_without_distillery(smoke, tmp_path):
    home, _ = smoke
    env = _env(home)
    dst = tmp_path / "champion"
    code = ("import sys; from distillery.platform import registry, tracking; tracking.configure(); "
            f"print(registry.download('tiny-sd', 'champion', dst={str(dst)!r}))")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, capture_output=True, text=True)
    load = ("import sys, torch; from diffusers import StableDiffusionPipeline; "
            f"p = StableDiffusionPipeline.from_pretrained({str(dst)!r}); "
            "img = p(['a handwritten digit three'], num_inference_steps=2, height=32, width=32, "
            "generator=torch.Generator().manual_seed(0)).images[0]; "
            "assert img.size == (32, 32); "
            "assert not any(m.startswith('distillery') for m in sys.modules), 'distillery was imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", load], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]


def test_cached_rerun_with_a_failing_gate_registers_nothing(smoke):
    """Same parameters with caching: data and training come from the cache; a gate nobody can pass stops the release."""
    home, _ = smoke
    strict = json.dumps({"fd": ["max", 0.0], "cond_acc": ["min", 1.01]})
    proc = _cli(home, "run", "tiny-sd", "--profile", "smoke", "--cache", "--set", f"gate_thresholds={strict}")
    assert "the gate did not pass" in proc.stdout
    client = _mlflow(home)
    trained = [r for r in _runs(client) if r.data.tags.get("task") in {"data", "train-vae", "train-unet"}]
    assert len(trained) == 3, "cached steps ran again"  # only the first run's
    assert [str(v.version) for v in client.search_model_versions("name='tiny-sd'")] == ["1"]
    assert str(client.get_model_version_by_alias("tiny-sd", "champion").version) == "1"
    gates = [r for r in _runs(client) if r.data.tags.get("task") == "gate" and r.data.metrics.get("gate_passed") == 0.0]
    assert len(gates) == 1, "the failing gate left no record"


def test_bad_data_stops_the_dag_at_validation(smoke, tmp_path):
    home, _ = smoke
    from distillery.data import build_image_caption_dataset

    bad = tmp_path / "bad"
    build_image_caption_dataset(bad, sources=("mnist",), resolution=32, per_class=10, data_dir=REPO / "data")
    captions = json.loads((bad / "captions.json").read_text())
    captions[0] = ""
    (bad / "captions.json").write_text(json.dumps(captions))
    proc = _cli(home, "run", "tiny-sd", "--profile", "smoke", "--set", f"dataset_uri={bad}", "--set",
                "model_name=tiny-sd-bad", check=False)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "validate" in text and "caption" in text.lower()
    client = _mlflow(home)
    tasks = [r.data.tags.get("task") for r in _runs(client)
             if r.data.tags.get("mlflow.parentRunId") and r.info.status != "FINISHED"]
    assert "validate" in tasks
    assert not client.search_model_versions("name='tiny-sd-bad'")
    trained = [r for r in _runs(client) if r.data.tags.get("task") in {"train-vae", "train-unet"}]
    assert len(trained) == 2  # only the first smoke run's


def test_invalid_parameters_fail_before_any_step(tmp_path):
    proc = _cli(tmp_path / "home", "run", "tiny-sd", "--set", "resolution=30", "--set", "unet_steps=-1", check=False)
    assert proc.returncode == 2
    assert "resolution" in proc.stdout and "unet_steps" in proc.stdout
    assert not (tmp_path / "home" / "pipeline_root").exists()


def run_notebook(name: str, home: Path, monkeypatch):
    """Execute notebooks/NAME headless against the runs in `home`; returns the executed notebook."""
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("DISTILLERY_HOME", str(home))
    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    return nb


def test_compare_notebook_executes_headless(smoke, monkeypatch):
    home, _ = smoke
    nb = run_notebook("compare_runs.ipynb", home, monkeypatch)
    table = next(o for o in nb.cells[2].outputs if o["output_type"] == "execute_result")["data"]["text/plain"]
    assert "cond_acc" in table and "fd" in table
    assert any("image/png" in o.get("data", {}) for o in nb.cells[3].outputs)


def test_compare_command_prints_table_and_plot(smoke, tmp_path):
    home, _ = smoke
    plot = tmp_path / "cmp.png"
    proc = _cli(home, "compare", "tiny-sd", "--metric", "fd", "--metric", "cond_acc", "--plot", str(plot))
    assert "fd" in proc.stdout and plot.stat().st_size > 1000
