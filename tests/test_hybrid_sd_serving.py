"""Cloud and edge predictors of a hybrid-sd release (untrained tiny parts): an image made through the two HTTP
endpoints equals the one made in one process; requests that do not fit are answered 400."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import requests

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
                             "--model-name", name, "--kind", kind, "--http-port", str(port), "--grpc-port", "0",
                             "--max-body-bytes", str(8 << 20)], stdout=sink, stderr=subprocess.STDOUT)
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
def servers(release, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    started = [_start(release, "hybrid-sd", kind, logs / f"{kind}.log") for kind in ("hybrid-cloud", "hybrid-edge")]
    yield started[0][1], started[1][1]
    for proc, _, sink in started:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:  # a loaded machine can be slow to shut KServe down
            proc.kill()
            proc.wait(10)
        sink.close()


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
