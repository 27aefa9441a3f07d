"""The Open Inference Protocol as a third-party client speaks it (tritonclient: REST with and without the binary
tensor extension, gRPC), model metadata, dynamic batching, overload, readiness, and the README's examples, for the
text-to-image and the policy predictor."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
from PIL import Image

from distillery.models import files, tiny_sd
from oip_contract import FUZZ, HEADERS, RAW, SD_FIELDS, _grpc, _http, _v1_bodies, _v2_bodies, fuzz_model
from test_serving import _free_port, start_server, stop_server

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    model = tmp_path_factory.mktemp("sd") / "model"
    tiny_sd.build_pipeline(tiny_sd.TinySDConfig()).save_pretrained(model)
    (model / "distillery.json").write_text('{"default_steps": 4, "max_steps": 20}')
    files.seal(model)
    return model


@pytest.fixture(scope="module")
def sd(sd_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "server.log"
    proc, url, sink = start_server(sd_dir, "tiny-sd", log, args=("--max-queue", "4", "--batch-window-ms", "20"))
    yield url, proc.grpc_port, log
    stop_server(proc, sink)


def _sd_inputs(prompts: list[str], binary: bool, seed: int = 5, steps: int = 3):
    prompt = httpclient.InferInput("prompt", [len(prompts)], "BYTES")
    s = httpclient.InferInput("steps", [1], "INT32")
    sd_seed = httpclient.InferInput("seed", [1], "INT64")
    prompt.set_data_from_numpy(np.array([p.encode() for p in prompts], dtype=np.object_), binary_data=binary)
    s.set_data_from_numpy(np.array([steps], dtype=np.int32), binary_data=binary)
    sd_seed.set_data_from_numpy(np.array([seed], dtype=np.int64), binary_data=binary)
    return [prompt, s, sd_seed]


def _v1_pngs(url: str, prompts: list[str], seed: int = 5, steps: int = 3) -> list[bytes]:
    r = requests.post(f"{url}/v1/models/tiny-sd:predict", timeout=120, json={
        "instances": [{"prompt": p, "steps": steps, "seed": seed} for p in prompts]})
    assert r.status_code == 200, r.text
    return [base64.b64decode(p["image_png_b64"]) for p in r.json()["predictions"]]


def test_tritonclient_rest_binary_rest_json_and_grpc_give_the_v1_images(sd):
    url, grpc_port, _ = sd
    prompts = ["a digit one", "a digit two"]
    want = _v1_pngs(url, prompts)
    client = _http(url)
    binary = client.infer("tiny-sd", _sd_inputs(prompts, binary=True),
                          outputs=[httpclient.InferRequestedOutput("image", binary_data=True)])
    assert list(binary.as_numpy("image")) == want
    as_json = client.infer("tiny-sd", _sd_inputs(prompts, binary=False),
                           outputs=[httpclient.InferRequestedOutput("image", binary_data=False)])
    assert [base64.b64decode(x) for x in as_json.as_numpy("image")] == want
    inputs = [{"name": "prompt", "datatype": "BYTES", "shape": [2], "data": prompts},
              {"name": "steps", "datatype": "INT32", "shape": [1], "data": [3]},
              {"name": "seed", "datatype": "INT64", "shape": [1], "data": [5]}]
    r = _grpc(grpc_port, "tiny-sd", inputs=inputs)
    assert r["live"] and r["ready"] and "error" not in r, r
    assert [base64.b64decode(x) for x in r["outputs"]["image"]] == want
    assert all(Image.open(io.BytesIO(p)).size == (32, 32) for p in want)
    inputs[1]["data"] = [500]
    bad = _grpc(grpc_port, "tiny-sd", inputs=inputs)
    assert bad["error"].startswith("StatusCode.INVALID_ARGUMENT") and "steps" in bad["error"], bad  # not INTERNAL


def test_grpc_listens_on_loopback_only(sd):
    _, grpc_port, _ = sd
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        rows = [line.split() for line in open(table).read().splitlines()[1:]]
        listening += [row[1].split(":")[0] for row in rows if row[3] == "0A" and int(row[1].split(":")[1], 16) == grpc_port]
    # 127.0.0.1, as IPv4 or IPv4-mapped IPv6 (gRPC's choice), never a wildcard
    assert listening and set(listening) <= {"0100007F", "0000000000000000FFFF00000100007F"}, listening


def test_model_metadata_declares_every_input_and_output(sd, policy_server):
    url, grpc_port, _ = sd
    meta = _http(url).get_model_metadata("tiny-sd")
    assert {i["name"]: (i["datatype"], i["shape"]) for i in meta["inputs"]} == {
        "prompt": ("BYTES", [-1]), "steps": ("INT32", [1]), "guidance": ("FP32", [1]), "seed": ("INT64", [1]),
        "negative_prompt": ("BYTES", [1])}
    assert meta["outputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    over_grpc = _grpc(grpc_port, "tiny-sd", "metadata")["metadata"]
    assert [o["name"] for o in over_grpc["outputs"]] == ["image"] and len(over_grpc["inputs"]) == 5
    purl, _ = policy_server
    pmeta = _http(purl).get_model_metadata("mode")
    assert {i["name"]: (i["datatype"], i["shape"]) for i in pmeta["inputs"]} == {
        "observations": ("FP32", [-1, 2, 39]), "task": ("BYTES", [-1]), "seed": ("INT64", [-1])}
    assert pmeta["outputs"] == [{"name": "actions", "datatype": "FP32", "shape": [-1, 4, 4]}]


def _same_image(a: bytes, b: bytes) -> bool:
    """Equal up to float rounding: CPU matrix kernels depend on the batch size (UNet outputs differ by ~1e-6), which
    can move a pixel by one grey level; a different prompt or seed changes the whole image."""
    x, y = (np.asarray(Image.open(io.BytesIO(p))).astype(int) for p in (a, b))
    return x.shape == y.shape and np.abs(x - y).max() <= 1 and (x == y).mean() >= 0.99


def test_batched_images_equal_unbatched_ones(sd_dir):
    """The same prompts and seeds, generated one call each and in one batched call, give the same images."""
    from distillery.serving.text_to_image import TextToImageModel

    model = TextToImageModel("tiny-sd", sd_dir)
    model.check()
    model.load()
    items = [("a digit one", 3), ("a digit two", 11), ("an emoji (flags)", 3), ("a digit one", 4)]
    alone = [model.run_batch((3, 3.0, ""), [item])[0] for item in items]
    batched = model.run_batch((3, 3.0, ""), items)
    assert all(_same_image(a, b) for a, b in zip(alone, batched))
    assert not _same_image(alone[0], alone[3]) and not _same_image(alone[0], alone[1])  # seed and prompt matter


def test_concurrent_requests_are_merged_and_each_gets_its_own_image(sd):
    """Concurrent requests come back with the images the same requests get one at a time (none lost or swapped)."""
    url, _, log = sd
    jobs = [(f"a digit {k}", 100 + k) for k in range(4)]
    want = {job: _v1_pngs(url, [job[0]], seed=job[1])[0] for job in jobs}
    with ThreadPoolExecutor(4) as ex:
        got = dict(zip(jobs, ex.map(lambda job: _v1_pngs(url, [job[0]], seed=job[1])[0], jobs)))
    assert all(_same_image(got[job], want[job]) for job in jobs)
    assert not any(_same_image(got[jobs[0]], want[job]) for job in jobs[1:])


def test_overload_is_answered_503_with_retry_after_at_once_and_deadlines_504(sd):
    url, _, _ = sd
    body = {"instances": [{"prompt": "x", "steps": 20, "seed": 1}]}

    def call(i):
        t = time.monotonic()
        r = requests.post(f"{url}/v1/models/tiny-sd:predict", json={"instances": [{"prompt": f"x{i}", "steps": 20}]},
                          timeout=300)
        return r.status_code, r.headers.get("Retry-After"), time.monotonic() - t

    with ThreadPoolExecutor(24) as ex:  # queue of 4, batches of 8: 24 at once is beyond it
        answers = list(ex.map(call, range(24)))
    codes = [a[0] for a in answers]
    assert set(codes) == {200, 503}, codes
    refused = [a for a in answers if a[0] == 503]
    assert all(a[1] and int(a[1]) >= 1 for a in refused)
    slowest_ok = max(a[2] for a in answers if a[0] == 200)
    assert min(a[2] for a in refused) < slowest_ok  # refused before the accepted ones were served
    r = requests.post(f"{url}/v1/models/tiny-sd:predict", json=body, headers={"x-request-timeout": "0.001"}, timeout=60)
    assert r.status_code == 504 and "deadline" in r.text
    r = requests.post(f"{url}/v1/models/tiny-sd:predict", json=body, headers={"x-request-timeout": "soon"}, timeout=60)
    assert r.status_code == 400 and "x-request-timeout" in r.text
    assert requests.post(f"{url}/v1/models/tiny-sd:predict", json=body, timeout=60).status_code == 200


def test_a_folder_whose_files_changed_is_refused_live_but_never_ready(sd_dir, tmp_path):
    import shutil

    tampered = tmp_path / "model"
    shutil.copytree(sd_dir, tampered)
    weights = next(tampered.glob("unet/*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(files.ModelFilesMismatch, match="sha256 differs: unet/"):
        files.verify(tampered)
    port = _free_port()
    with (tmp_path / "server.log").open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "distillery.serving", "--model-dir", str(tampered),
                                 "--model-name", "tiny-sd", "--http-port", str(port), "--grpc-port", "0"],
                                stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while "refusing to load it" not in (tmp_path / "server.log").read_text():
            assert time.time() < deadline and proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            time.sleep(0.5)
        base = f"http://127.0.0.1:{port}"
        assert requests.get(f"{base}/v2/health/live", timeout=10).status_code == 200
        assert requests.get(f"{base}/v2/health/ready", timeout=10).status_code == 503
        assert requests.get(f"{base}/v2/models/tiny-sd/ready", timeout=10).status_code == 503
        assert requests.get(f"{base}/v2/models/tiny-sd", timeout=10).status_code == 503  # metadata too, not a 500
        r = requests.post(f"{base}/v1/models/tiny-sd:predict", json={"instances": [{"prompt": "x"}]}, timeout=10)
        assert r.status_code == 503 and "not ready" in r.text
    finally:
        proc.terminate()
        proc.wait(15)


def test_a_fatal_model_error_turns_readiness_false(sd_dir):
    """Anything but a client error from the model call fails that batch with 503 and takes readiness away."""
    import asyncio

    from distillery.serving.batching import ModelFailed
    from distillery.serving.text_to_image import TextToImageModel

    model = TextToImageModel("tiny-sd", sd_dir)
    model.check()
    model.load()
    assert model.ready and asyncio.run(model.healthy())

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    model.pipe = broken
    with pytest.raises(ModelFailed, match="illegal memory access"):
        asyncio.run(model.predict({"instances": [{"prompt": "x", "steps": 1}]}))
    assert not model.ready and "RuntimeError" in model.failure


def test_readme_examples_run_as_printed(sd):
    """Every `curl` and tritonclient example of the README, run as printed (only the port differs)."""
    url, _, _ = sd
    text = README.read_text()
    blocks = re.findall(r"```bash\n(curl .*?)```", text, flags=re.S)
    assert blocks, "no curl example in the README"
    for block in blocks:
        command = block.replace("localhost:8080", url.removeprefix("http://"))
        out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        answer = json.loads(out.stdout)
        assert "predictions" in answer or "outputs" in answer, out.stdout[:300]
    clients = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "tritonclient" in b]
    assert clients, "no tritonclient example in the README"
    for block in clients:
        code = block.replace("localhost:8080", url.removeprefix("http://"))
        check = "\nassert png[:8] == b'\\x89PNG\\r\\n\\x1a\\n', png[:20]\nprint('ok')\n"
        out = subprocess.run([sys.executable, "-c", code + check], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# --------------------------------------------------------------------------------------------- policy


@pytest.fixture(scope="module")
def policy_server(tmp_path_factory):
    from test_serving_policy import build_policy

    model = build_policy(tmp_path_factory.mktemp("policy"))
    proc, url, sink = start_server(model, "mode", tmp_path_factory.mktemp("plog") / "server.log")
    yield url, proc.grpc_port
    stop_server(proc, sink)


def _policy_inputs(obs: np.ndarray, tasks: list[str], seeds: list[int], binary: bool):
    o = httpclient.InferInput("observations", list(obs.shape), "FP32")
    t = httpclient.InferInput("task", [len(tasks)], "BYTES")
    s = httpclient.InferInput("seed", [len(seeds)], "INT64")
    o.set_data_from_numpy(obs.astype(np.float32), binary_data=binary)
    t.set_data_from_numpy(np.array([x.encode() for x in tasks], dtype=np.object_), binary_data=binary)
    s.set_data_from_numpy(np.array(seeds, dtype=np.int64), binary_data=binary)
    return [o, t, s]


def test_policy_over_tritonclient_rest_binary_json_and_grpc(policy_server):
    url, grpc_port = policy_server
    obs = np.random.default_rng(0).normal(size=(2, 2, 39)).round(4)
    tasks, seeds = ["push-v3", "reach-v3"], [3, 5]
    r = requests.post(f"{url}/v1/models/mode:predict", timeout=60, json={"instances": [
        {"task": t, "observations": o.tolist(), "seed": s} for o, t, s in zip(obs, tasks, seeds)]})
    want = np.array([p["actions"] for p in r.json()["predictions"]], dtype=np.float32)
    client = _http(url)
    for binary in (True, False):
        out = client.infer("mode", _policy_inputs(obs, tasks, seeds, binary),
                           outputs=[httpclient.InferRequestedOutput("actions", binary_data=binary)])
        np.testing.assert_allclose(out.as_numpy("actions"), want, atol=1e-6)
    inputs = [{"name": "observations", "datatype": "FP32", "shape": [2, 2, 39], "data": obs.reshape(-1).tolist()},
              {"name": "task", "datatype": "BYTES", "shape": [2], "data": tasks},
              {"name": "seed", "datatype": "INT64", "shape": [2], "data": seeds}]
    r = _grpc(grpc_port, "mode", inputs=inputs)
    np.testing.assert_allclose(np.array(r["outputs"]["actions"]), want, atol=1e-6)
    inputs[1]["data"] = ["fly-v3", "push-v3"]
    bad = _grpc(grpc_port, "mode", inputs=inputs)
    assert bad["error"].startswith("StatusCode.INVALID_ARGUMENT") and "unknown task" in bad["error"], bad


# ------------------------------------------------------------------------------------------------ fuzzing

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

@FUZZ
@given(v1=_v1_bodies(SD_FIELDS), v2=_v2_bodies(["prompt", "steps", "guidance", "seed", "negative_prompt"]),
       headers=HEADERS, raw=RAW, which=st.booleans())
def test_fuzz_text_to_image_answers_4xx_never_5xx(sd, v1, v2, headers, raw, which):
    fuzz_model(sd[0], "tiny-sd", v1, v2, headers, raw, which)


def test_text_to_image_still_serves_after_fuzzing(sd):
    assert requests.get(f"{sd[0]}/v2/health/ready", timeout=10).status_code == 200
    assert len(_v1_pngs(sd[0], ["x"], steps=1)) == 1


POLICY_FIELDS = {"task": st.sampled_from(["push-v3", "reach-v3", "open the door", "fly"]) | st.text(max_size=8),
                 "observations": st.lists(st.lists(st.floats(width=32), min_size=39, max_size=39), min_size=1,
                                          max_size=3), "seed": st.integers(-3, 2**64)}


@FUZZ
@given(v1=_v1_bodies(POLICY_FIELDS), v2=_v2_bodies(["observations", "task", "seed"]), headers=HEADERS, raw=RAW,
       which=st.booleans())
def test_fuzz_policy_answers_4xx_never_5xx(policy_server, v1, v2, headers, raw, which):
    fuzz_model(policy_server[0], "mode", v1, v2, headers, raw, which)


def test_policy_still_serves_after_fuzzing(policy_server):
    url = policy_server[0]
    assert requests.get(f"{url}/v2/health/ready", timeout=10).status_code == 200
    r = requests.post(f"{url}/v1/models/mode:predict", timeout=60,
                      json={"instances": [{"task": "reach-v3", "observations": [[0.0] * 39] * 2}]})
    assert r.status_code == 200, r.text


# ------------------------------------------------------------------------------------------------ load


@pytest.mark.slow
def test_bounded_load_no_5xx_but_declared_503s_and_no_mixed_up_answers(sd, policy_server):
    """bench/load.py for a few seconds per endpoint, at and above the queue bound."""
    sys.path.insert(0, str(README.parent / "bench"))
    import load

    endpoints = [(sd[0], ep) for ep in load.text_to_image_endpoints("tiny-sd", steps=2, n_keys=3)]
    endpoints += [(policy_server[0], ep) for ep in load.policy_endpoints("mode", 2, 39, n_keys=3)]
    for url, ep in endpoints:
        load.record(url, ep)
        for clients in (8, 24):
            row = load.run_load(url, ep, clients, seconds=3)
            assert row["ok"] > 0 and row["other_5xx"] == row["503_without_retry_after"] == 0, row
            assert row["mismatched"] == row["errors"] == 0, row


def test_batch_cost_keeps_batched_images_within_a_grey_level_with_onednn_on_and_off(sd_dir):
    """The benchmark's in-process part: both oneDNN settings give batched images equal to unbatched ones (within
    the tolerance the predictor promises), and oneDNN is left on, as the predictor serves."""
    import torch

    sys.path.insert(0, str(README.parent / "bench"))
    import load

    rows = load.batch_cost(sd_dir, steps=2, capacity=3)
    assert [r["onednn"] for r in rows] == [True, False]
    assert all(r["max_pixel_diff"] <= 1 and r["pixels_differing"] <= 0.01 and r["batch_s"] > 0 for r in rows), rows
    assert torch.backends.mkldnn.enabled
