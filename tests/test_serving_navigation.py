"""The navigation predictor over HTTP on 127.0.0.1: V1 and V2 give the policy's commands, malformed scans are
answered 400, an ir-sim episode is driven entirely through the endpoint, tritonclient reads its metadata and infers
over REST and gRPC, and fuzzed requests never get a 5xx."""

from __future__ import annotations

import numpy as np
import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st

from distillery.papers.smdp_nav import NavConfig
from distillery.papers.smdp_nav import scenarios as S
from distillery.papers.smdp_nav.policy import NavPolicy
from distillery.papers.smdp_nav.train import train_policy
from distillery.rl.ppo import PPOConfig
from oip_contract import FUZZ, HEADERS, RAW, _grpc, _http, _v1_bodies, _v2_bodies, assert_metadata_declared, fuzz_model
from test_serving import start_server, stop_server


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("nav")
    cfg = NavConfig()
    train_policy(S.generate(2, seed=0, cfg=cfg), root / "model", cfg, PPOConfig(num_envs=4, hidden=16),
                 variant="smdp", sim_budget_s=80.0, rollout_s=10.0)
    return root / "model"


@pytest.fixture(scope="module")
def served(policy_dir, tmp_path_factory):
    """(REST URL, gRPC port)."""
    proc, url, sink = start_server(policy_dir, "nav", tmp_path_factory.mktemp("log") / "server.log")
    yield url, proc.grpc_port
    stop_server(proc, sink)


@pytest.fixture(scope="module")
def server(served):
    return served[0]


def _instance(scan=None, beams=36):
    return {"scan": scan if scan is not None else np.linspace(0.5, 4.0, beams).round(3).tolist(),
            "goal": [3.0, 0.4], "velocity": [0.2, 0.0]}


def test_v1_and_v2_return_the_policys_command(server, policy_dir):
    local = NavPolicy(policy_dir)
    r = requests.post(f"{server}/v1/models/nav:predict", json={"instances": [_instance(), _instance()]}, timeout=30)
    assert r.status_code == 200, r.text
    p = r.json()["predictions"][0]
    v, w, tau = local.command(np.array([_instance()["scan"]]), [3.0], [0.4], [0.2], [0.0])
    assert (p["v"], p["w"], p["duration"]) == pytest.approx((v[0], w[0], tau[0]), abs=1e-5)
    cfg = local.cfg
    assert 0 <= p["v"] <= cfg.v_max and cfg.tau_min - 1e-6 <= p["duration"] <= cfg.tau_max + 1e-6
    body = {"inputs": [{"name": "scan", "datatype": "FP32", "shape": [1, 36], "data": _instance()["scan"]},
                       {"name": "goal", "datatype": "FP32", "shape": [1, 2], "data": [3.0, 0.4]},
                       {"name": "velocity", "datatype": "FP32", "shape": [1, 2], "data": [0.2, 0.0]}]}
    r = requests.post(f"{server}/v2/models/nav/infer", json=body, timeout=30)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["name"] == "command" and out["shape"] == [1, 3]
    assert out["data"] == pytest.approx([p["v"], p["w"], p["duration"]], abs=1e-5)


@pytest.mark.parametrize("instance, message", [
    (_instance(scan=[1.0] * 35), "36 values"),
    (_instance(scan=[1.0] * 35 + ["NaN"]), "NaN"),
    (_instance(scan=[1.0] * 35 + ["far"]), "numbers"),
    ({**_instance(), "goal": [1.0]}, "'goal' must have 2"),
    ({"scan": [1.0] * 36, "goal": [1.0, 0.0]}, "exactly"),
    (_instance(scan=[-1.0] * 36), ">= 0"),
])
def test_malformed_inputs_are_answered_400(server, instance, message):
    r = requests.post(f"{server}/v1/models/nav:predict", json={"instances": [instance]}, timeout=30)
    assert r.status_code == 400 and message in r.text, r.text
    nan = '{"instances": [{"scan": [NaN' + ", 1.0" * 35 + '], "goal": [1, 0], "velocity": [0, 0]}]}'
    r = requests.post(f"{server}/v1/models/nav:predict", data=nan, headers={"Content-Type": "application/json"},
                      timeout=30)
    assert r.status_code == 400, r.text


def test_an_irsim_episode_through_the_endpoint(server, policy_dir):
    from distillery.papers.smdp_nav import irsim_eval

    calls = []

    def act(scan, d, b, v, w):
        r = requests.post(f"{server}/v1/models/nav:predict", timeout=30,
                          json={"instances": [{"scan": scan.tolist(), "goal": [d, b], "velocity": [v, w]}]})
        assert r.status_code == 200, r.text
        p = r.json()["predictions"][0]
        calls.append(p)
        return p["v"], p["w"], p["duration"]

    ep = irsim_eval.episode(NavConfig(), seed=3, act=act)
    assert ep["decisions"] == len(calls) >= 1 and (ep["arrived"] or ep["collided"] or ep["time"] >= 40.0 - 1e-6)


def test_v2_binary_tensors_as_a_third_party_client_sends_them(served):
    """tritonclient over REST with binary tensor data in and out, and over gRPC: the metadata declares every input
    and output, and the answers are the command of the JSON V1 request."""
    import tritonclient.http as httpclient

    server, grpc_port = served
    client = _http(server)
    assert_metadata_declared(client.get_model_metadata("nav"))
    inputs = []
    for name, value in (("scan", [_instance()["scan"]]), ("goal", [[3.0, 0.4]]), ("velocity", [[0.2, 0.0]])):
        x = httpclient.InferInput(name, [1, len(value[0])], "FP32")
        x.set_data_from_numpy(np.array(value, np.float32), binary_data=True)
        inputs.append(x)
    out = client.infer("nav", inputs, outputs=[httpclient.InferRequestedOutput("command", binary_data=True)])
    got = out.as_numpy("command")
    p = requests.post(f"{server}/v1/models/nav:predict", json={"instances": [_instance()]}, timeout=30).json()
    assert got.shape == (1, 3) and got[0] == pytest.approx([p["predictions"][0][k] for k in ("v", "w", "duration")],
                                                           abs=1e-5)
    r = _grpc(grpc_port, "nav", inputs=[{"name": x.name(), "datatype": "FP32", "shape": x.shape(), "data": value}
                                        for x, value in zip(inputs, (_instance()["scan"], [3.0, 0.4], [0.2, 0.0]))])
    assert "error" not in r, r
    assert_metadata_declared(r["metadata"])
    assert r["outputs"]["command"] == [pytest.approx(list(got[0]), abs=1e-6)]


NAV_FIELDS = {"scan": st.lists(st.floats(-1, 20, width=32), min_size=35, max_size=37),
              "goal": st.lists(st.floats(width=32), min_size=1, max_size=3),
              "velocity": st.lists(st.floats(width=32), min_size=1, max_size=3)}


@FUZZ
@given(v1=_v1_bodies(NAV_FIELDS), v2=_v2_bodies(list(NAV_FIELDS)), headers=HEADERS, raw=RAW, which=st.booleans())
def test_fuzz_answers_4xx_never_5xx(server, v1, v2, headers, raw, which):
    fuzz_model(server, "nav", v1, v2, headers, raw, which)


def test_still_serves_after_fuzzing(server):
    assert requests.get(f"{server}/v2/health/ready", timeout=10).status_code == 200
    r = requests.post(f"{server}/v1/models/nav:predict", json={"instances": [_instance()]}, timeout=30)
    assert r.status_code == 200, r.text
