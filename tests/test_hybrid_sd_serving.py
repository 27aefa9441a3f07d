"""Cloud and edge predictors of a hybrid-sd release (untrained tiny parts): an image made through the two HTTP
endpoints equals the one made in one process; requests that do not fit are answered 400; and the serving contract
of every kind (hashes checked at load, readiness, a bounded queue, metadata, tritonclient over REST and gRPC,
fuzzing)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from distillery.serving.hybrid import STATE_INPUTS
from oip_contract import (FUZZ, HEADERS, PARAMETERS, RAW, _grpc, _http, _v1_bodies, _v2_bodies,
                          assert_metadata_declared, fuzz_model)
from test_serving import _free_port

pytestmark = pytest.mark.slow

PROMPTS = ["an emoji of a red heart", "an emoji of a cat"]
STEPS, SPLIT, GUIDANCE = 5, 2, 3.0


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    from distillery.models import tiny_sd
    from distillery.papers.hybrid_sd import distill, pruning
    from distillery.steps.hybrid_sd import assemble_release

    root = tmp_path_factory.mktemp("hybrid")
    pipe = tiny_sd.build_pipeline(tiny_sd.TinySDConfig(), seed=0)
    pipe.save_pretrained(root / "teacher")
    names = [c.name for c in pruning.candidates(pipe.unet)]
    small = pruning.prune(pipe.unet, {n: 0.5 for n in names})
    small.save_pretrained(root / "small")
    distill.build_tiny_vae(pipe.vae, distill.TinyVAEConfig(channels=8)).save_pretrained(root / "vae")
    assemble_release(root / "teacher", root / "small", root / "vae", root / "release",
                     {"steps": STEPS, "split": SPLIT, "order": "large-small", "guidance_scale": GUIDANCE,
                      "resolution": 32})
    return root / "release"


def _start(model_dir, name, kind, log):
    port = _free_port()
    sink = log.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "distillery.serving", "--model-dir", str(model_dir),
                             "--model-name", name, "--kind", kind, "--http-port", str(port), "--grpc-port",
                             str(grpc_port := _free_port()), "--max-body-bytes", str(8 << 20)],
                            stdout=sink, stderr=subprocess.STDOUT)
    proc.grpc_port = grpc_port
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return proc, url, sink
        except (requests.ConnectionError, requests.Timeout):  # not listening yet, or busy loading
            time.sleep(0.3)
        if proc.poll() is not None:
            pytest.fail(f"{kind} server exited: {log.read_text()[-3000:]}")
    proc.kill()
    pytest.fail(f"{kind} server not ready")


@pytest.fixture(scope="module")
def hybrid(release, tmp_path_factory):
    """Each kind's (REST URL, gRPC port)."""
    logs = tmp_path_factory.mktemp("logs")
    started = [_start(release, "hybrid-sd", kind, logs / f"{kind}.log") for kind in ("hybrid-cloud", "hybrid-edge")]
    yield {kind: (url, proc.grpc_port) for kind, (proc, url, _) in zip(("hybrid-cloud", "hybrid-edge"), started)}
    for proc, _, sink in started:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:  # a loaded machine can be slow to shut KServe down
            proc.kill()
            proc.wait(10)
        sink.close()


@pytest.fixture(scope="module")
def servers(hybrid):
    return hybrid["hybrid-cloud"][0], hybrid["hybrid-edge"][0]


def _prompt_input(prompts):
    return {"name": "prompt", "datatype": "BYTES", "shape": [len(prompts)], "data": prompts}


def _cloud(url, seed=7):
    r = requests.post(f"{url}/v2/models/hybrid-sd/infer", timeout=120,
                      json={"inputs": [_prompt_input(PROMPTS)], "parameters": {"seed": seed}})
    assert r.status_code == 200, r.text
    return r.json()["outputs"], len(r.content)


def _edge(url, outputs, prompts=PROMPTS):
    body = {"inputs": [_prompt_input(prompts), *({k: o[k] for k in ("name", "datatype", "shape", "data")}
                                                 for o in outputs)]}
    return requests.post(f"{url}/v2/models/hybrid-sd/infer", json=body, timeout=120)


def test_cloud_then_edge_over_http_equals_one_process(release, servers):
    from distillery.papers.hybrid_sd import release as rel
    from distillery.papers.hybrid_sd import sampler

    cloud_url, edge_url = servers
    outputs, cloud_bytes = _cloud(cloud_url)
    by = {o["name"]: o for o in outputs}
    assert by["step_index"]["data"] == [SPLIT] and by["steps"]["data"] == [STEPS]
    assert by["latents"]["shape"] == [2, 4, 8, 8] and by["model_outputs"]["shape"] == [2, 2, 4, 8, 8]
    r = _edge(edge_url, outputs)
    assert r.status_code == 200, r.text
    edge_out = {o["name"]: o for o in r.json()["outputs"]}
    got = np.asarray(edge_out["latents"]["data"], np.float32).reshape(edge_out["latents"]["shape"])
    assert len(edge_out["image"]["data"]) == 2 and cloud_bytes > 0

    cloud, edge = rel.load_cloud(release), rel.load_edge(release)
    want = sampler.hybrid_latents(cloud, cloud.unet, edge.unet, PROMPTS, [7, 8], steps=STEPS, k=SPLIT,
                                  guidance_scale=GUIDANCE)
    assert float(np.abs(got - want.numpy()).max()) <= 1e-4

    # `distillery edge`'s client: the cloud over HTTP, the rest in this process.
    from distillery.serving.hybrid import edge_client

    images, stats = edge_client(cloud_url, "hybrid-sd", release, PROMPTS, seed=7)
    expected = sampler.decode(edge.vae, want)
    assert images.shape == expected.shape == (2, 32, 32, 3)
    assert int(np.abs(images.astype(int) - expected.astype(int)).max()) <= 1
    assert stats["split"] == SPLIT and stats["bytes_from_cloud"] > 4 * 2 * 3 * 4 * 8 * 8


def test_bad_requests_get_400(servers):
    cloud_url, edge_url = servers
    outputs, _ = _cloud(cloud_url, seed=1)

    def edited(name, **change):
        return [{**o, **change} if o["name"] == name else o for o in outputs]

    lat = next(o for o in outputs if o["name"] == "latents")
    cases = {
        "latent shape": edited("latents", shape=[2, 4, 4, 16]),
        "value count": edited("latents", data=lat["data"][:-1]),
        "step past the end": edited("step_index", data=[STEPS + 1]),
        "negative step": edited("step_index", data=[-1]),
        "history that does not fit the step": edited("step_index", data=[1]),
        "guidance of another release": edited("guidance", data=[7.0]),
        "missing state": [o for o in outputs if o["name"] != "model_outputs"],
    }
    for what, body in cases.items():
        r = _edge(edge_url, body)
        assert r.status_code == 400, (what, r.status_code, r.text)
    # NaN cannot travel in JSON: the body is refused before the model sees it.
    raw = json.dumps({"inputs": [_prompt_input(PROMPTS), *edited("latents", data=[float("nan")] * len(lat["data"]))]})
    r = requests.post(f"{edge_url}/v2/models/hybrid-sd/infer", data=raw, timeout=60,
                      headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    r = requests.post(f"{cloud_url}/v2/models/hybrid-sd/infer", timeout=60,
                      json={"inputs": [_prompt_input(PROMPTS)], "parameters": {"split": STEPS + 1}})
    assert r.status_code == 400 and "split" in r.text
    r = requests.post(f"{cloud_url}/v1/models/hybrid-sd:predict", timeout=60, json={"instances": [{"prompt": "x"}]})
    assert 400 <= r.status_code < 500


def test_edge_refuses_nan_latents_in_process(release):
    """The predictor's own check (a binary or gRPC body can carry NaN even though JSON cannot)."""
    import asyncio

    import kserve
    from kserve.errors import InvalidInput

    from distillery.serving.hybrid import EdgeModel

    model = EdgeModel("hybrid-sd", release)
    model.load()
    nan = np.full((1, 4, 8, 8), np.nan, np.float32)
    inputs = [kserve.InferInput("prompt", [1], "BYTES", ["x"]),
              kserve.InferInput("latents", list(nan.shape), "FP32", nan.flatten().tolist()),
              kserve.InferInput("model_outputs", [0, 1, 4, 8, 8], "FP32", []),
              kserve.InferInput("step_index", [1], "INT64", [0]),
              kserve.InferInput("lower_order_nums", [1], "INT64", [0]),
              kserve.InferInput("steps", [1], "INT64", [STEPS]),
              kserve.InferInput("guidance", [1], "FP32", [GUIDANCE])]
    with pytest.raises(InvalidInput, match="NaN"):
        asyncio.run(model.predict(kserve.InferRequest("hybrid-sd", inputs)))


# ------------------------------------------------------------------------------------------ the serving contract


def test_tritonclient_reads_the_metadata_and_infers_over_rest_binary_and_grpc(hybrid):
    import base64

    import tritonclient.http as httpclient

    (cloud_url, cloud_grpc), (edge_url, edge_grpc) = hybrid["hybrid-cloud"], hybrid["hybrid-edge"]
    meta = {kind: _http(url).get_model_metadata("hybrid-sd") for kind, (url, _) in hybrid.items()}
    for m in meta.values():
        assert_metadata_declared(m)
    assert [t["name"] for t in meta["hybrid-cloud"]["inputs"]] == ["prompt"]
    assert [t["name"] for t in meta["hybrid-cloud"]["outputs"]] == list(STATE_INPUTS)
    assert [t["name"] for t in meta["hybrid-edge"]["inputs"]] == ["prompt", *STATE_INPUTS]
    assert meta["hybrid-edge"]["outputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                                              {"name": "latents", "datatype": "FP32", "shape": [-1, 4, 8, 8]}]

    # REST with binary tensors both ways, the cloud's outputs handed to the edge as they came: the JSON answers.
    prompt = httpclient.InferInput("prompt", [len(PROMPTS)], "BYTES")
    prompt.set_data_from_numpy(np.array([p.encode() for p in PROMPTS], dtype=np.object_))
    first = _http(cloud_url).infer("hybrid-sd", [prompt], parameters={"seed": 7},
                                   outputs=[httpclient.InferRequestedOutput(n, binary_data=True) for n in STATE_INPUTS])
    inputs = [prompt]
    for name in STATE_INPUTS:
        arr = first.as_numpy(name)
        inputs.append(httpclient.InferInput(name, list(arr.shape), "INT64" if arr.dtype == np.int64 else "FP32"))
        inputs[-1].set_data_from_numpy(arr)
    second = _http(edge_url).infer("hybrid-sd", inputs,
                                   outputs=[httpclient.InferRequestedOutput(n, binary_data=True) for n in ("image", "latents")])
    json_cloud, _ = _cloud(cloud_url, seed=7)
    by = {o["name"]: o for o in json_cloud}
    np.testing.assert_allclose(first.as_numpy("latents"), np.reshape(by["latents"]["data"], by["latents"]["shape"]),
                               atol=1e-6)
    json_edge = {o["name"]: o for o in _edge(edge_url, json_cloud).json()["outputs"]}
    pngs = list(second.as_numpy("image"))
    assert pngs == [base64.b64decode(x) for x in json_edge["image"]["data"]] and pngs[0].startswith(b"\x89PNG")
    np.testing.assert_allclose(second.as_numpy("latents"),
                               np.reshape(json_edge["latents"]["data"], json_edge["latents"]["shape"]), atol=1e-6)

    # gRPC (seed 0, the default), the same way.
    cloud = _grpc(cloud_grpc, "hybrid-sd", inputs=[_prompt_input(PROMPTS)])
    assert "error" not in cloud, cloud
    specs = [_prompt_input(PROMPTS)] + [
        {"name": n, "datatype": "FP32" if n in ("latents", "model_outputs", "guidance") else "INT64",
         "shape": list(np.shape(cloud["outputs"][n])), "data": cloud["outputs"][n]} for n in STATE_INPUTS]
    edge = _grpc(edge_grpc, "hybrid-sd", inputs=specs)
    assert "error" not in edge, edge
    assert_metadata_declared(cloud["metadata"])
    assert_metadata_declared(edge["metadata"])
    json_edge = {o["name"]: o for o in _edge(edge_url, _cloud(cloud_url, seed=0)[0]).json()["outputs"]}
    assert edge["outputs"]["image"] == json_edge["image"]["data"]  # base64 of the same PNGs


V1_PROMPTS = _v1_bodies({"prompt": st.text(max_size=30)})


@FUZZ
@given(v1=V1_PROMPTS, v2=_v2_bodies(["prompt"], PARAMETERS + ("split",)), headers=HEADERS, raw=RAW,
       which=st.booleans())
def test_fuzz_cloud_answers_4xx_never_5xx(servers, v1, v2, headers, raw, which):
    fuzz_model(servers[0], "hybrid-sd", v1, v2, headers, raw, which)


@FUZZ
@given(v1=V1_PROMPTS, v2=_v2_bodies(["prompt", *STATE_INPUTS]), headers=HEADERS, raw=RAW, which=st.booleans())
def test_fuzz_edge_answers_4xx_never_5xx(servers, v1, v2, headers, raw, which):
    fuzz_model(servers[1], "hybrid-sd", v1, v2, headers, raw, which)


@pytest.fixture(scope="module")
def cloud_state(servers):
    return {o["name"]: o for o in _cloud(servers[0], seed=3)[0]}


@settings(FUZZ, max_examples=25)
@given(step_index=st.integers(-1, STEPS + 1), steps=st.none() | st.integers(0, 12), lower=st.none() | st.integers(-1, 3),
       kept=st.none() | st.integers(0, 3), scale=st.sampled_from([1.0, 0.0, -1e30]))
def test_fuzz_edge_state_answers_4xx_never_5xx(servers, cloud_state, step_index, steps, lower, kept, scale):
    """The cloud's real outputs with the solver state changed (None: what fits the step): the edge runs the rest of
    the steps or answers 400, never a 5xx."""
    fits = min(max(step_index, 0), 2)  # DPM-Solver++ (order 2) holds this many outputs after step_index steps
    history = np.asarray(cloud_state["model_outputs"]["data"]).reshape(cloud_state["model_outputs"]["shape"])
    history = np.concatenate([history, history])[:fits if kept is None else kept] * scale
    state = {**cloud_state,
             "model_outputs": {**cloud_state["model_outputs"], "shape": list(history.shape),
                               "data": history.reshape(-1).tolist()},
             **{name: {**cloud_state[name], "data": [value]} for name, value in (
                 ("step_index", step_index), ("steps", STEPS if steps is None else steps),
                 ("lower_order_nums", fits if lower is None else lower))}}
    r = _edge(servers[1], state.values())
    assert r.status_code in (200, 400), (r.status_code, r.text[:500])


def test_hybrid_still_serves_after_fuzzing(servers):
    cloud_url, edge_url = servers
    assert all(requests.get(f"{url}/v2/health/ready", timeout=10).status_code == 200 for url in servers)
    assert _edge(edge_url, _cloud(cloud_url)[0]).status_code == 200


def test_a_changed_release_is_refused_at_load_and_never_ready(release, tmp_path):
    import asyncio
    import shutil

    from distillery.models import files
    from distillery.serving.hybrid import CloudModel, EdgeModel

    tampered = tmp_path / "release"
    shutil.copytree(release, tampered)
    weights = next((tampered / "edge" / "unet").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    for kind in (CloudModel, EdgeModel):
        model = kind("hybrid-sd", tampered)
        model.check()
        assert not asyncio.run(model.healthy())  # not ready before it is loaded
        with pytest.raises(files.ModelFilesMismatch, match="sha256 differs: edge/unet/"):
            model.load()
        assert not model.ready and "ModelFilesMismatch" in model.failure


def test_a_full_queue_is_503_and_a_fatal_model_error_takes_readiness_away(release, monkeypatch):
    import asyncio

    import kserve
    import torch

    from distillery.papers.hybrid_sd import sampler
    from distillery.serving.batching import ModelFailed, Overloaded
    from distillery.serving.hybrid import CloudModel

    model = CloudModel("hybrid-sd", release, max_queue=1)
    model.check()
    model.load()
    assert model.ready

    def request():
        return kserve.InferRequest("hybrid-sd", [kserve.InferInput("prompt", [1], "BYTES", ["x"])])

    def slow(pipe, unet, prompts, seeds, *, steps, k, guidance_scale):
        time.sleep(0.2)
        return torch.zeros(len(prompts), 4, 8, 8), sampler.SchedulerState(k)

    async def burst():
        return await asyncio.gather(*(model.predict(request()) for _ in range(4)), return_exceptions=True)

    monkeypatch.setattr(sampler, "run_first", slow)
    answers = asyncio.run(burst())
    assert any(isinstance(a, kserve.InferResponse) for a in answers), answers
    refused = [a for a in answers if isinstance(a, Overloaded)]
    assert refused and all(a.retry_after_s >= 1 for a in refused), answers

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(sampler, "run_first", broken)
    with pytest.raises(ModelFailed, match="illegal memory access"):
        asyncio.run(model.predict(request()))
    assert not model.ready and "RuntimeError" in model.failure and not asyncio.run(model.healthy())
