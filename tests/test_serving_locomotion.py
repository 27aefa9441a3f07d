"""The locomotion predictor over HTTP on 127.0.0.1: V1 and V2 give the student's actions, wrong shapes and NaN are
answered 400, and a whole Walker2d episode on rough terrain is driven through the endpoint."""

from __future__ import annotations

import numpy as np
import pytest
import requests

from distillery.papers.teacher_prior import PriorConfig, TerrainConfig, TerrainVecEnv, train_ppo
from distillery.papers.teacher_prior.env import FRAME
from distillery.papers.teacher_prior.policy import load_policy
from distillery.rl.ppo import PPOConfig
from test_serving import start_server, stop_server

CFG = TerrainConfig(episode_steps=40, history=2, heights_ahead=4)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    """A PPO student from scratch: the predictor serves any student the same way (and refuses the teacher)."""
    root = tmp_path_factory.mktemp("loco")
    train_ppo(root / "model", CFG, PPOConfig(num_envs=2, hidden=16, epochs=1, minibatches=2), role="scratch",
              env_steps=40, rollout_steps=20, pc=PriorConfig())
    return root / "model"


@pytest.fixture(scope="module")
def server(policy_dir, tmp_path_factory):
    proc, url, sink = start_server(policy_dir, "loco", tmp_path_factory.mktemp("log") / "server.log")
    yield url
    stop_server(proc, sink)


def _history(seed: int = 0) -> list:
    return np.random.default_rng(seed).normal(size=(CFG.history, FRAME)).round(4).tolist()


def test_v1_and_v2_return_the_students_action(server, policy_dir):
    local = load_policy(policy_dir)
    r = requests.post(f"{server}/v1/models/loco:predict",
                      json={"instances": [{"observations": _history(0)}, {"observations": _history(1)}]}, timeout=30)
    assert r.status_code == 200, r.text
    got = [p["action"] for p in r.json()["predictions"]]
    want = local.act_history(np.array([_history(0), _history(1)]))
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(got).max() <= 1.0
    body = {"inputs": [{"name": "observations", "datatype": "FP32", "shape": [1, CFG.history, FRAME],
                        "data": np.ravel(_history(0)).tolist()}]}
    r = requests.post(f"{server}/v2/models/loco/infer", json=body, timeout=30)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["name"] == "actions" and out["shape"] == [1, 6]
    np.testing.assert_allclose(out["data"], want[0], atol=1e-5)
    meta = requests.get(f"{server}/v2/models/loco", timeout=30).json()
    assert meta["inputs"][0]["shape"] == [-1, CFG.history, FRAME]


@pytest.mark.parametrize("instance, message", [
    ({"observations": np.zeros((CFG.history + 1, FRAME)).tolist()}, "must be shaped"),
    ({"observations": np.zeros((CFG.history, FRAME - 1)).tolist()}, "must be shaped"),
    ({"observations": [["x"] * FRAME] * CFG.history}, "numbers"),
    ({"observations": _history(), "privileged": [1.0]}, "exactly"),
])
def test_malformed_inputs_are_answered_400(server, instance, message):
    r = requests.post(f"{server}/v1/models/loco:predict", json={"instances": [instance]}, timeout=30)
    assert r.status_code == 400 and message in r.text, r.text
    frame = "[NaN" + ", 0.0" * (FRAME - 1) + "]"
    nan = '{"instances": [{"observations": [' + ", ".join([frame] * CFG.history) + "]}]}"
    r = requests.post(f"{server}/v1/models/loco:predict", data=nan, headers={"Content-Type": "application/json"},
                      timeout=30)
    assert r.status_code == 400 and "NaN" in r.text, r.text
    body = {"inputs": [{"name": "observations", "datatype": "FP32", "shape": [1, FRAME], "data": [0.0] * FRAME}]}
    assert requests.post(f"{server}/v2/models/loco/infer", json=body, timeout=30).status_code == 400


def test_an_episode_through_the_endpoint(server, policy_dir):
    """Every action of one episode comes from the endpoint; the result equals the local policy's episode."""
    local = load_policy(policy_dir)

    def episode(act) -> tuple[float, int]:
        env = TerrainVecEnv(CFG, 1, seed=5)
        obs = env.reset([123])
        for t in range(CFG.episode_steps):
            obs, _, term, trunc, info = env.step(act(obs["student"].reshape(1, CFG.history, FRAME)))
            if term[0] or trunc[0]:
                return float(info["episode_return"][0]), t + 1
        raise AssertionError("the episode did not end")

    def remote(history):
        r = requests.post(f"{server}/v1/models/loco:predict", json={"instances": [{"observations": history[0].tolist()}]},
                          timeout=30)
        assert r.status_code == 200, r.text
        return np.array([r.json()["predictions"][0]["action"]])

    ret, steps = episode(remote)
    local_ret, local_steps = episode(local.act_history)
    assert steps == local_steps >= 1 and ret == pytest.approx(local_ret, abs=1e-3)


def test_the_privileged_teacher_is_refused(tmp_path, home):
    from distillery.serving.locomotion import LocomotionModel

    train_ppo(tmp_path / "t", CFG, PPOConfig(num_envs=2, hidden=8, epochs=1, minibatches=2), role="teacher",
              env_steps=20, rollout_steps=10)
    with pytest.raises(ValueError, match="privileged teacher"):
        LocomotionModel("t", tmp_path / "t").load_model()
