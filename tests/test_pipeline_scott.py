"""The scott smoke DAG end to end through the KFP local runner (sweep with 2 parallel workers included), the
served student, and the imported-teacher branch."""

from __future__ import annotations

import base64
import io
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import REPO
from test_pipeline_tiny_sd import _cli, _env, _mlflow, _runs, run_notebook
from test_serving import start_server, stop_server

pytestmark = pytest.mark.slow

METHODS = ("cd-ode", "scott", "scott-adv")
STEPS = {"data", "validate", "feature-net", "train-vae", "train-unet", "evaluate", "gate", "register", "deploy",
         *(f"{step}-{m}" for m in METHODS for step in ("select-best", "distill")),
         *(f"sweep-{m}-{w}" for m in METHODS for w in (0, 1))}
KNOBS = {"cd-ode": {"lr"}, "scott": {"lr", "noise_strength"}, "scott-adv": {"lr", "noise_strength", "adv_weight"}}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    home = tmp_path_factory.mktemp("scott") / "home"
    proc = _cli(home, "run", "scott", "--profile", "smoke", "--cache")
    return home, proc


def _children(runs, parent):
    return {r.data.tags["task"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}


def test_smoke_run_sweeps_distills_evaluates_and_registers(smoke):
    home, proc = smoke
    assert "distillery serve scott" in proc.stdout, proc.stdout[-3000:]
    client = _mlflow(home)
    runs = _runs(client, "distillery/scott")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = _children(runs, parents[0])
    assert set(children) == STEPS
    assert all(r.info.status == "FINISHED" for r in children.values())

    # Per method one study shared by two workers, one trial each (same budget for every method); every trial is a
    # run nested under its worker's run, scored at the rungs (1 and 4 steps); successive halving may stop one.
    trials = [r for r in runs if r.data.tags.get("optuna.trial") is not None]
    assert len(trials) == 6
    for m in METHODS:
        mine = [r for r in trials if r.data.tags["optuna.study"].endswith(f"-{m}")]
        assert len(mine) == 2 and len({r.data.tags["optuna.study"] for r in mine}) == 1
        assert sorted(int(r.data.tags["optuna.trial"]) for r in mine) == [0, 1]
        workers = {children[f"sweep-{m}-{w}"].info.run_id for w in (0, 1)}
        assert {r.data.tags["mlflow.parentRunId"] for r in mine} <= workers
        assert all(set(r.data.params) == KNOBS[m] for r in mine)
        complete = [r for r in mine if r.data.tags["optuna.state"] == "COMPLETE"]
        assert complete and all(r.data.tags["optuna.state"] in ("COMPLETE", "PRUNED") for r in mine)
        assert all(math.isfinite(r.data.metrics["objective"]) for r in complete)
        history = client.get_metric_history(complete[0].info.run_id, "fd")
        assert [h.step for h in history] == [1, 4]  # scored at each rung, trained on from its checkpoint
        best = children[f"select-best-{m}"].data.metrics
        assert best["best_value"] == pytest.approx(min(r.data.metrics["objective"] for r in complete))
        # Each method is distilled with its own best values.
        distilled = children[f"distill-{m}"].data.params
        assert float(distilled["lr"]) == pytest.approx(best["lr"])
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
    artifacts = [a.path for a in client.list_artifacts(children["evaluate"].info.run_id, "samples")]
    assert len(artifacts) == 14
    top = {a.path for a in client.list_artifacts(children["evaluate"].info.run_id)}
    assert {"evaluation_table.json", "evaluation_table.md", "fd_vs_steps.png"} <= top

    mv = client.get_model_version_by_alias("scott", "champion")
    assert str(mv.version) == "1"


@pytest.fixture(scope="module")
def served(smoke, tmp_path_factory):
    home, _ = smoke
    dst = tmp_path_factory.mktemp("student") / "model"
    code = ("from distillery.platform import registry, tracking; tracking.configure(); "
            f"registry.download('scott', 'champion', dst={str(dst)!r})")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(home), check=True, capture_output=True)
    proc, url, sink = start_server(dst, "scott", dst.parent / "server.log", env=_env(home))
    yield url, dst
    stop_server(proc, sink)


def _local(model_dir, prompt: str, steps: int, seed: int) -> np.ndarray:
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return np.asarray(pipe([prompt], num_inference_steps=steps, guidance_scale=1.0,
                           generator=[torch.Generator().manual_seed(seed)]).images[0])


def test_served_student_answers_v1_and_v2_with_the_steps_asked(smoke, served):
    url, model_dir = served
    runs = _runs(_mlflow(smoke[0]), "distillery/scott")
    released = {r.data.tags["released_method"] for r in runs if r.data.tags.get("task") == "evaluate"}
    assert {json.loads((model_dir / "distillery.json").read_text())["method"]} == released  # the winner is served
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


def test_scott_notebook_executes_headless(smoke, monkeypatch):
    home, _ = smoke
    nb = run_notebook("scott_table.ipynb", home, monkeypatch)
    table = next(o for o in nb.cells[2].outputs if o["output_type"] == "execute_result")["data"]["text/plain"]
    assert "scott-adv" in table and "teacher" in table and "cd-ode" in table
    assert any("image/png" in o.get("data", {}) for o in nb.cells[3].outputs)
