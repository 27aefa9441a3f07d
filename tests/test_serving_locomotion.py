"""The locomotion predictor over HTTP on 127.0.0.1: V1 and V2 give the student's actions, wrong shapes and NaN are
answered 400, a whole Walker2d episode on rough terrain is driven through the endpoint, tritonclient reads its
metadata and infers over REST and gRPC, and fuzzed requests never get a 5xx."""

from __future__ import annotations

import numpy as np
import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st

from distillery.papers.teacher_prior import PriorConfig, TerrainConfig, TerrainVecEnv, train_ppo
from distillery.papers.teacher_prior.env import FRAME
from distillery.papers.teacher_prior.policy import load_policy
from distillery.rl.ppo import PPOConfig
from oip_contract import (FUZZ, HEADERS, RAW, _grpc, _http, _v1_bodies, _v2_bodies, assert_metadata_declared,
                          fuzz_model)
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
def served(policy_dir, tmp_path_factory):
    """(REST URL, gRPC port)."""
    proc, url, sink = start_server(policy_dir, "loco", tmp_path_factory.mktemp("log") / "server.log")
    yield url, proc.grpc_port
    stop_server(proc, sink)


@pytest.fixture(scope="module")
def server(served):
    return served[0]


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


def test_tritonclient_reads_the_metadata_and_infers_over_rest_binary_and_grpc(served):
    import tritonclient.http as httpclient

    url, grpc_port = served
    meta = _http(url).get_model_metadata("loco")
    assert_metadata_declared(meta)
    history = np.array([_history(0), _history(1)], np.float32)
    r = requests.post(f"{url}/v1/models/loco:predict", timeout=30,
                      json={"instances": [{"observations": h.tolist()} for h in history]})
    want = np.array([p["action"] for p in r.json()["predictions"]], np.float32)
    obs = httpclient.InferInput("observations", list(history.shape), "FP32")
    obs.set_data_from_numpy(history, binary_data=True)
    out = _http(url).infer("loco", [obs], outputs=[httpclient.InferRequestedOutput("actions", binary_data=True)])
    np.testing.assert_allclose(out.as_numpy("actions"), want, atol=1e-6)
    r = _grpc(grpc_port, "loco", inputs=[{"name": "observations", "datatype": "FP32", "shape": list(history.shape),
                                          "data": history.reshape(-1).tolist()}])
    assert "error" not in r, r
    assert_metadata_declared(r["metadata"])
    np.testing.assert_allclose(np.array(r["outputs"]["actions"]), want, atol=1e-6)


LOCO_FIELDS = {"observations": st.lists(st.lists(st.floats(width=32), min_size=FRAME, max_size=FRAME), min_size=1,
                                        max_size=CFG.history + 1)}


@FUZZ
@given(v1=_v1_bodies(LOCO_FIELDS), v2=_v2_bodies(["observations"]), headers=HEADERS, raw=RAW, which=st.booleans())
def test_fuzz_answers_4xx_never_5xx(server, v1, v2, headers, raw, which):
    fuzz_model(server, "loco", v1, v2, headers, raw, which)


def test_still_serves_after_fuzzing(server):
    assert requests.get(f"{server}/v2/health/ready", timeout=10).status_code == 200
    r = requests.post(f"{server}/v1/models/loco:predict", json={"instances": [{"observations": _history()}]},
                      timeout=30)
    assert r.status_code == 200, r.text
