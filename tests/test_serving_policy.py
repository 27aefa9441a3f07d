"""The policy predictor over HTTP on 127.0.0.1: V1, V2, invalid observations, a Meta-World episode driven
entirely through the endpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import requests

from distillery.data import demos as dm
from distillery.papers.mode import MoDEConfig
from distillery.papers.mode import evaluate as ev
from distillery.papers.mode.policy import Policy, train_policy
from test_serving import start_server, stop_server

JSON = {"Content-Type": "application/json"}


def build_policy(root):
    """A tiny MoDE policy trained for a few steps on one demonstration per MT10 task; returns its folder."""
    dm.collect_mt10_demos(root / "demos", episodes_per_task=1, progress=False)
    cfg = MoDEConfig(width=32, depth=2, expert_hidden=32, chunk=4, obs_history=2)
    train_policy(dm.load_demos(root / "demos"), root / "model", cfg, steps=5, batch_size=32, sampling_steps=4)
    return root / "model"


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return build_policy(tmp_path_factory.mktemp("policy"))


@pytest.fixture(scope="module")
def server(policy_dir, tmp_path_factory):
    proc, url, sink = start_server(policy_dir, "mode", tmp_path_factory.mktemp("log") / "server.log")
    yield url
    stop_server(proc, sink)


def _obs(n: int = 2) -> list:
    return np.random.default_rng(0).normal(size=(n, 39)).round(4).tolist()


def test_v1_and_v2_return_the_action_chunk_the_policy_computes(server, policy_dir):
    local = Policy(policy_dir)
    r = requests.post(f"{server}/v1/models/mode:predict", timeout=30,
                      json={"instances": [{"task": "push-v3", "observations": _obs(), "seed": 3}]})
    assert r.status_code == 200, r.text
    actions = np.array(r.json()["predictions"][0]["actions"])
    assert actions.shape == (4, 4) and np.abs(actions).max() <= 1
    np.testing.assert_allclose(actions, local.act(np.array([_obs()], np.float32), ["push-v3"], seed=3)[0], atol=1e-5)

    body = {"inputs": [{"name": "observations", "datatype": "FP32", "shape": [2, 2, 39], "data": sum(_obs(4), [])},
                       {"name": "task", "datatype": "BYTES", "shape": [2], "data": ["reach-v3", "open the door"]}],
            "parameters": {"seed": 3}}
    r = requests.post(f"{server}/v2/models/mode/infer", json=body, timeout=30)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["name"] == "actions" and out["shape"] == [2, 4, 4] and len(out["data"]) == 32


def test_v1_instances_use_their_own_seeds(server, policy_dir):
    local = Policy(policy_dir)
    one = lambda seed: requests.post(f"{server}/v1/models/mode:predict", timeout=30, json={"instances": [
        {"task": "push-v3", "observations": _obs(), "seed": seed}]}).json()["predictions"][0]["actions"]
    r = requests.post(f"{server}/v1/models/mode:predict", timeout=30, json={"instances": [
        {"task": "push-v3", "observations": _obs(), "seed": 3}, {"task": "push-v3", "observations": _obs(), "seed": 5}]})
    assert r.status_code == 200, r.text
    batch = [np.array(p["actions"]) for p in r.json()["predictions"]]
    np.testing.assert_allclose(batch[0], one(3), atol=1e-5)
    np.testing.assert_allclose(batch[1], one(5), atol=1e-5)  # the second instance's seed is not ignored
    assert np.abs(batch[0] - batch[1]).max() > 1e-3
    with pytest.raises(ValueError, match="2 seeds for 1"):
        local.act(np.array([_obs()], np.float32), ["push-v3"], seed=[1, 2])


@pytest.mark.parametrize("body,words", [
    ({"instances": [{"task": "push-v3", "observations": [[0.0] * 38] * 2}]}, "shaped [2, 39]"),
    ({"instances": [{"task": "push-v3", "observations": [[0.0] * 39]}]}, "shaped [2, 39]"),
    ({"instances": [{"task": "push-v3", "observations": [[float("nan")] + [0.0] * 38] * 2}]}, "nan"),
    ({"instances": [{"task": "push-v3", "observations": [["x"] * 39] * 2}]}, "numbers"),
    ({"instances": [{"task": "fly-v3", "observations": [[0.0] * 39] * 2}]}, "unknown task"),
    ({"instances": [{"observations": [[0.0] * 39] * 2}]}, "task"),
    ({"instances": [{"task": "push-v3", "observations": [[0.0] * 39] * 2, "seed": -2}]}, "seed"),
    ({"instances": [{"task": "push-v3", "observations": [[0.0] * 39] * 2, "speed": 2}]}, "unknown field"),
    ({"instances": []}, "instances"),
    ({"inputs": [{"name": "observations", "datatype": "FP32", "shape": [1, 2, 39], "data": [0.0] * 78}]}, "task"),
    ({"inputs": [{"name": "observations", "datatype": "FP32", "shape": [1, 2, 38], "data": [0.0] * 76},
                 {"name": "task", "datatype": "BYTES", "shape": [1], "data": ["push-v3"]}]}, "shaped"),
    ({"inputs": [{"name": "observations", "datatype": "FP32", "shape": [1, 2, 39], "data": [0.0] * 78},
                 {"name": "task", "datatype": "BYTES", "shape": [1], "data": ["nope"]}]}, "unknown task"),
])
def test_invalid_requests_get_400_and_the_server_keeps_serving(server, body, words):
    path = "/v2/models/mode/infer" if "inputs" in body else "/v1/models/mode:predict"
    r = requests.post(server + path, data=json.dumps(body), headers=JSON, timeout=30)
    assert r.status_code == 400, (r.status_code, r.text)
    assert words.lower() in r.text.lower(), r.text
    ok = requests.post(f"{server}/v1/models/mode:predict", timeout=30,
                       json={"instances": [{"task": "reach-v3", "observations": _obs()}]})
    assert ok.status_code == 200


def test_a_metaworld_episode_runs_entirely_through_the_endpoint(server, policy_dir):
    """Every action the simulator executes comes from an HTTP call; the same episode run in-process matches."""
    calls = []

    def over_http(history, task, seed):
        calls.append(seed)
        r = requests.post(f"{server}/v1/models/mode:predict", timeout=30,
                          json={"instances": [{"task": task, "observations": history.tolist(), "seed": seed}]})
        assert r.status_code == 200, r.text
        return np.array(r.json()["predictions"][0]["actions"], dtype=np.float32)

    local = Policy(policy_dir)
    remote = ev.rollout(local, "reach-v3", variation=3, seed=3, max_steps=40, execute=2, act=over_http)
    here = ev.rollout(local, "reach-v3", variation=3, seed=3, max_steps=40, execute=2)
    assert remote["steps"] == here["steps"] and len(calls) == remote["policy_calls"] >= 1
    np.testing.assert_allclose(remote["hand"], here["hand"], atol=1e-3)
