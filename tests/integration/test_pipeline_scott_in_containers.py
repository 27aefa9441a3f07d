"""The scott smoke DAG, the suite's one run of it, as a cluster runs it: every step (the sweep workers included,
each in its own container, sharing one Optuna study on PostgreSQL) in the built image as uid 1000, configured only
by the rendered ConfigMap and Secret, tracked on the MLflow server with artifacts on RGW. Then the champion is
pulled from the server's registry and served, and the SCott notebook reads the server's runs."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import requests
from PIL import Image

from integration.containers import REPO, check_lineage
from test_pipeline_tiny_sd import run_notebook
from test_serving import start_server, stop_server

pytestmark = pytest.mark.slow

MODEL = "scott-ct"
METHODS = ("cd-ode", "scott", "scott-adv")
STEPS = {"data", "validate", "feature-net", "train-vae", "train-unet", "evaluate", "gate", "register", "deploy",
         *(f"{step}-{m}" for m in METHODS for step in ("select-best", "distill")),
         *(f"sweep-{m}-{w}" for m in METHODS for w in (0, 1))}
KNOBS = {"cd-ode": {"lr"}, "scott": {"lr", "noise_strength"}, "scott-adv": {"lr", "noise_strength", "adv_weight"}}


@pytest.fixture(scope="module")
def scott_run(cluster_like, image, s3):
    """(MLflow client, step runs by task, every run of the experiment, the server-pointing env for clients)."""
    run, client, env = cluster_like
    # The teacher only has to exist: the checks are about the DAG, the sweep and the release, not its quality.
    seconds = run("scott", dict(model_name=MODEL, feature_steps=30, vae_steps=30, unet_steps=40))
    print(f"scott smoke in containers: {seconds:.1f} s")
    children = check_lineage(client, "scott", MODEL, STEPS, image, s3)
    exp = client.get_experiment_by_name("distillery/scott")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    client_env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILLERY_")}
    client_env.update({k: env[k] for k in ("DISTILLERY_TRACKING_URI", "DISTILLERY_S3_ENDPOINT_URL",
                                           "DISTILLERY_ARTIFACT_LOCATION")})
    return client, children, runs, client_env


def test_scott_smoke_sweeps_distills_evaluates_and_registers_in_containers(scott_run):
    client, children, runs, _ = scott_run
    assert set(children) == STEPS

    # Per method one study shared by two workers (two containers), one trial each (the same budget for every
    # method); every trial is a run nested under its worker's run, scored at the rungs (1 and 4 steps); successive
    # halving may stop one.
    workers = {children[f"sweep-{m}-{w}"].info.run_id for m in METHODS for w in (0, 1)}
    trials = [r for r in runs if r.data.tags.get("optuna.trial") is not None
              and r.data.tags.get("mlflow.parentRunId") in workers]
    assert len(trials) == 6
    for m in METHODS:
        mine = [r for r in trials if r.data.tags["optuna.study"].endswith(f"-{m}")]
        assert len(mine) == 2 and len({r.data.tags["optuna.study"] for r in mine}) == 1
        assert sorted(int(r.data.tags["optuna.trial"]) for r in mine) == [0, 1]
        assert {r.data.tags["mlflow.parentRunId"] for r in mine} <= {
            children[f"sweep-{m}-{w}"].info.run_id for w in (0, 1)}
        assert all(set(r.data.params) == KNOBS[m] for r in mine)
        complete = [r for r in mine if r.data.tags["optuna.state"] == "COMPLETE"]
        assert complete and all(r.data.tags["optuna.state"] in ("COMPLETE", "PRUNED") for r in mine)
        assert all(math.isfinite(r.data.metrics["objective"]) for r in complete)
        history = client.get_metric_history(complete[0].info.run_id, "fd")
        assert [h.step for h in history] == [1, 4]  # scored at each rung, trained on from its checkpoint
        best = children[f"select-best-{m}"].data.metrics
        assert best["best_value"] == pytest.approx(min(r.data.metrics["objective"] for r in complete))
        # Each method is distilled with its own best values.
        assert float(children[f"distill-{m}"].data.params["lr"]) == pytest.approx(best["lr"])
    assert float(children["distill-scott-adv"].data.params["noise_strength"]) == pytest.approx(
        children["select-best-scott-adv"].data.metrics["noise_strength"])
    assert float(children["distill-cd-ode"].data.metrics["noise_strength"]) == 0.0

    ev = children["evaluate"].data.metrics
    for model, steps in [("teacher", (1, 2, 4, 25, 50)), ("cd_ode", (1, 2, 4)), ("scott", (1, 2, 4)),
                         ("scott_adv", (1, 2, 4))]:
        for k in steps:
            assert math.isfinite(ev[f"{model}_{k}step_fd"]), (model, k)
            # guidance doubles the teacher's UNet evaluations; the students run once per step
            assert ev[f"{model}_{k}step_unet_evals_per_image"] == (2 * k if model == "teacher" else k)
    assert ev["unet_eval_reduction"] == pytest.approx(25.0)
    # The release is the student with the best FD at 2 steps, whichever method it is.
    released = children["evaluate"].data.tags["released_method"]
    assert ev["fd"] == ev[f"{released.replace('-', '_')}_2step_fd"] == min(
        ev[f"{m.replace('-', '_')}_2step_fd"] for m in METHODS)
    evaluate_id = children["evaluate"].info.run_id
    assert len(client.list_artifacts(evaluate_id, "samples")) == 14
    assert {"evaluation_table.json", "evaluation_table.md", "fd_vs_steps.png"} <= {
        a.path for a in client.list_artifacts(evaluate_id)}
    assert "inferenceservice.yaml" in {a.path for a in client.list_artifacts(children["deploy"].info.run_id)}


@pytest.fixture(scope="module")
def served(scott_run, tmp_path_factory):
    """The champion pulled from the server's registry (weights from RGW) by a client, served on loopback."""
    *_, env = scott_run
    dst = tmp_path_factory.mktemp("student") / "model"
    code = ("from distillery.platform import registry, tracking; tracking.configure(); "
            f"registry.download({MODEL!r}, 'champion', dst={str(dst)!r})")
    home = dst.parent / "home"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**env, "DISTILLERY_HOME": str(home)},
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    server, url, sink = start_server(dst, "scott", dst.parent / "server.log", env={**env, "DISTILLERY_HOME": str(home)})
    yield url, dst
    stop_server(server, sink)


def _local(model_dir, prompt: str, steps: int, seed: int) -> np.ndarray:
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return np.asarray(pipe([prompt], num_inference_steps=steps, guidance_scale=1.0,
                           generator=[torch.Generator().manual_seed(seed)]).images[0])


def test_served_student_answers_v1_and_v2_with_the_steps_asked(scott_run, served):
    _, children, _, _ = scott_run
    url, model_dir = served
    # The winner of the evaluation is what the registry serves.
    assert json.loads((model_dir / "distillery.json").read_text())["method"] == \
        children["evaluate"].data.tags["released_method"]
    prompt = "a handwritten digit seven"
    images = {}
    for steps in (1, 4):
        r = requests.post(f"{url}/v1/models/scott:predict", timeout=60,
                          json={"instances": [{"prompt": prompt, "steps": steps, "seed": 5}]})
        assert r.status_code == 200, r.text
        pred = r.json()["predictions"][0]
        assert pred["steps"] == steps
        images[steps] = np.asarray(Image.open(io.BytesIO(base64.b64decode(pred["image_png_b64"]))))
    body = {"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": [prompt]}],
            "parameters": {"seed": 5}}  # no steps: the student's default, 2
    r = requests.post(f"{url}/v2/models/scott/infer", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["parameters"]["steps"] == 2
    images[2] = np.asarray(Image.open(io.BytesIO(base64.b64decode(out["outputs"][0]["data"][0]))))
    # What came back is what the pipeline makes in exactly that many steps. The server's thread count differs
    # from the test's, so float sums may round differently: a pixel may be off by one 8-bit level, no more.
    for steps, got in images.items():
        want = _local(model_dir, prompt, steps, 5)
        diff = np.abs(got.astype(int) - want.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (steps, diff.max(), (diff > 0).mean())
    assert not np.array_equal(images[1], images[4])

    r = requests.post(f"{url}/v1/models/scott:predict", json={"instances": [{"prompt": prompt, "guidance": 3.0}]},
                      timeout=30)
    assert r.status_code == 400 and "guidance" in r.text  # guidance is distilled in; applying it again is refused
    r = requests.post(f"{url}/v1/models/scott:predict", json={"instances": [{"prompt": prompt, "steps": 50}]},
                      timeout=30)
    assert r.status_code == 400 and "steps" in r.text


def test_scott_notebook_reads_the_tracking_server(scott_run, tmp_path, monkeypatch):
    *_, env = scott_run
    for key in ("DISTILLERY_TRACKING_URI", "DISTILLERY_S3_ENDPOINT_URL"):
        monkeypatch.setenv(key, env[key])
    nb = run_notebook("scott_table.ipynb", tmp_path / "home", monkeypatch)
    table = next(o for o in nb.cells[2].outputs if o["output_type"] == "execute_result")["data"]["text/plain"]
    assert "scott-adv" in table and "teacher" in table and "cd-ode" in table
    assert any("image/png" in o.get("data", {}) for o in nb.cells[3].outputs)
