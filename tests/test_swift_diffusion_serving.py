"""The SwiftDiffusion predictor over HTTP (untrained tiny SD, add-ons in a local store): LoRAs and a ControlNet by
name in V1 and V2, what happened reported per request and in /metrics, and every client mistake a 4xx while the
server keeps serving; for it and its baseline kind, tritonclient over REST and gRPC and fuzzed requests (never a
5xx)."""

from __future__ import annotations

import base64
import io
import json
import shutil
import time

import numpy as np
import pytest
import requests
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from oip_contract import (FUZZ, HEADERS, RAW, SD_FIELDS, _grpc, _http, _v1_bodies, _v2_bodies,
                          assert_metadata_declared, fuzz_model)
from test_serving import start_server, stop_server
from test_storage import s3  # noqa: F401 - the moto S3 fixture
from test_swift_diffusion import CFG, _random_lora, _squares

from distillery.models import tiny_sd
from distillery.papers.swift_diffusion import addons, train


def _png(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


EDGES = _png(addons.edge_map(_squares()[:1])[0])


@pytest.fixture(scope="module")
def swift(tmp_path_factory):
    """The swift-diffusion predictor: (REST URL, gRPC port, add-on store, log)."""
    from diffusers import ControlNetModel
    from safetensors.torch import save_file

    model = tmp_path_factory.mktemp("swift")
    pipe = tiny_sd.build_pipeline(CFG, seed=0)
    pipe.save_pretrained(model)
    (model / "distillery.json").write_text(json.dumps({"kind": "swift-diffusion", "default_steps": 3, "max_steps": 10,
                                                       "wait_fraction": 0.4, "max_loras": 2}))
    store = model / "addons"
    for i, name in enumerate(("ink", "bold", "gone")):
        (store / "lora" / name).mkdir(parents=True)
        save_file(_random_lora(pipe.unet, i), str(store / "lora" / name / addons.LORA_FILE), metadata={"format": "pt"})
    (store / "lora" / "alien").mkdir()
    save_file({"unet.nowhere.lora_A.weight": torch.zeros(2, 4), "unet.nowhere.lora_B.weight": torch.zeros(4, 2)},
              str(store / "lora" / "alien" / addons.LORA_FILE))
    cn = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=train.conditioning_channels(4))
    with torch.no_grad():
        for p in [*cn.controlnet_down_blocks.parameters(), *cn.controlnet_mid_block.parameters()]:
            p.normal_(0, 0.2)
    cn.save_pretrained(store / "controlnet" / "edges", safe_serialization=True)
    log = tmp_path_factory.mktemp("log") / "server.log"
    proc, url, sink = start_server(model, "swift", log)  # kind "auto": read from distillery.json
    yield url, proc.grpc_port, store, log
    stop_server(proc, sink)


@pytest.fixture(scope="module")
def served(swift):
    url, _, store, log = swift
    return url, store, log


@pytest.fixture(scope="module")
def baseline(served, tmp_path_factory):
    """The same folder served the plain diffusers way, a kind of its own: (REST URL, gRPC port)."""
    _, store, _ = served
    proc, url, sink = start_server(store.parent, "swift", tmp_path_factory.mktemp("blog") / "server.log",
                                   args=("--kind", "swift-diffusion-baseline"))
    yield url, proc.grpc_port
    stop_server(proc, sink)


@pytest.fixture(scope="module", params=["swift-diffusion", "swift-diffusion-baseline"])
def kind(request):
    """Each kind's (REST URL, gRPC port)."""
    return request.getfixturevalue("swift")[:2] if request.param == "swift-diffusion" \
        else request.getfixturevalue("baseline")


def _v1(url, **fields):
    return requests.post(f"{url}/v1/models/swift:predict",
                         json={"instances": [{"prompt": "a bright square", "seed": 1, **fields}]}, timeout=60)


def test_v1_loras_and_controlnet_report_what_happened(served):
    url, *_ = served
    plain = _v1(url)
    assert plain.status_code == 200, plain.text
    assert plain.json()["predictions"][0]["addons"] == {"wait_step": 1, "loras": [], "guidance_split": False}
    first = _v1(url, loras=[{"name": "ink", "scale": 0.8}, {"name": "bold"}],
                controlnet={"name": "edges", "image": EDGES, "scale": 0.9})
    assert first.status_code == 200, first.text
    report = first.json()["predictions"][0]["addons"]
    assert [(e["name"], e["cache"]) for e in report["loras"]] == [("ink", "miss"), ("bold", "miss")]
    assert all(0 <= e["applied_from_step"] <= report["wait_step"] == 1 for e in report["loras"])
    assert report["controlnet"] == {"name": "edges", "cache": "miss", "parallel": True, "process": True,
                                    "conditional_half_only": True, "compiled": False, "unet_calls": 3}
    again = _v1(url, loras=[{"name": "ink", "scale": 0.8}, {"name": "bold"}],
                controlnet={"name": "edges", "image": EDGES, "scale": 0.9}).json()["predictions"][0]
    assert [(e["cache"], e["applied_from_step"]) for e in again["addons"]["loras"]] == [("hit", 0), ("hit", 0)]
    assert again["addons"]["controlnet"]["cache"] == "hit"
    assert again["image_png_b64"] != plain.json()["predictions"][0]["image_png_b64"]


def test_v2_addons_as_tensors_and_the_report_as_a_parameter(served):
    url, *_ = served
    body = {"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [2], "data": ["a dark square", "a square"]},
                       {"name": "lora_name", "datatype": "BYTES", "shape": [1], "data": ["bold"]},
                       {"name": "lora_scale", "datatype": "FP32", "shape": [1], "data": [1.5]},
                       {"name": "controlnet", "datatype": "BYTES", "shape": [1], "data": ["edges"]},
                       {"name": "control_image", "datatype": "BYTES", "shape": [1], "data": [EDGES]}],
            "parameters": {"steps": 2}}
    r = requests.post(f"{url}/v2/models/swift/infer", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["outputs"][0]["shape"] == [2]
    report = json.loads(out["parameters"]["addons"])
    assert report["loras"][0]["name"] == "bold" and report["loras"][0]["scale"] == 1.5
    assert report["controlnet"]["name"] == "edges"
    inputs = {i["name"] for i in requests.get(f"{url}/v2/models/swift", timeout=5).json()["inputs"]}
    assert {"prompt", "lora_name", "lora_scale", "controlnet", "control_image"} <= inputs


def _wrong_size() -> str:
    return _png(np.zeros((32, 32, 3), np.uint8))


def _huge_canvas() -> str:
    buf = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buf, format="PNG")  # 10 kB that would decode to 81 M RGB pixels
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("fields,words", [
    ({"loras": [{"name": "sepia"}]}, "unknown lora 'sepia'; available: ['alien', 'bold', 'gone', 'ink']"),
    ({"loras": [{"name": "ink", "scale": 5}]}, "between 0.0 and 2.0"),
    ({"loras": [{"name": "ink", "scale": "x"}]}, "number"),
    ({"loras": [{"name": "ink", "weight": 1}]}, "each LoRA must be"),
    ({"loras": [{"name": "ink"}, {"name": "ink"}]}, "twice"),
    ({"loras": [{"name": "ink"}, {"name": "bold"}, {"name": "gone"}]}, "at most 2"),
    ({"loras": [{"name": "../controlnet/edges"}]}, "letters, digits"),
    ({"loras": [{"name": "alien"}]}, "does not fit this model"),
    ({"controlnet": {"name": "canny", "image": EDGES}}, "unknown controlnet 'canny'"),
    ({"controlnet": {"name": "edges"}}, "must be {"),
    ({"controlnet": {"name": "edges", "image": "not base64!"}}, "base64"),
    ({"controlnet": {"name": "edges", "image": base64.b64encode(b"GIF89a...").decode()}}, "not a readable image"),
    ({"controlnet": {"name": "edges", "image": _wrong_size()}}, "must be 16x16 pixels, got 32x32"),
    ({"controlnet": {"name": "edges", "image": _huge_canvas()}}, "must be 16x16 pixels, got 9000x9000"),
    ({"controlnet": {"name": "edges", "image": EDGES, "scale": -1}}, "between 0.0 and 2.0"),
    ({"styles": ["ink"]}, "unknown field"),
])
def test_client_mistakes_get_400_and_the_server_keeps_serving(served, fields, words):
    url, *_ = served
    r = _v1(url, steps=1, **fields)
    assert r.status_code == 400, (r.status_code, r.text)
    assert words.lower() in r.text.lower(), r.text
    assert _v1(url, steps=1).status_code == 200


@pytest.mark.parametrize("inputs,words", [
    ([{"name": "lora_scale", "datatype": "FP32", "shape": [1], "data": [1.0]}], "without 'lora_name'"),
    ([{"name": "lora_name", "datatype": "BYTES", "shape": [2], "data": ["ink", "bold"]},
      {"name": "lora_scale", "datatype": "FP32", "shape": [1], "data": [1.0]}], "one value per"),
    ([{"name": "controlnet", "datatype": "BYTES", "shape": [1], "data": ["edges"]}], "needs both"),
    ([{"name": "lora_name", "datatype": "FP32", "shape": [1], "data": [1.0]}], "BYTES"),
])
def test_v2_mistakes_get_400(served, inputs, words):
    url, *_ = served
    body = {"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["x"]}, *inputs],
            "parameters": {"steps": 1}}
    r = requests.post(f"{url}/v2/models/swift/infer", json=body, timeout=60)
    assert r.status_code == 400 and words.lower() in r.text.lower(), r.text


def test_a_failing_addon_store_is_a_503_for_that_request_only(served):
    url, store, log = served
    shutil.rmtree(store / "lora" / "gone")  # still in the index the predictor read at start
    r = _v1(url, steps=1, loras=[{"name": "gone"}])
    assert r.status_code == 503 and "could not be fetched" in r.text, r.text
    assert requests.get(f"{url}/v2/health/ready", timeout=5).status_code == 200
    assert _v1(url, steps=1, loras=[{"name": "ink"}]).status_code == 200


def test_an_addon_added_to_the_store_is_found_by_name(served):
    from distillery.serving.swift_diffusion import INDEX_REFRESH_S

    url, store, _ = served
    shutil.copytree(store / "lora" / "ink", store / "lora" / "fresh")
    time.sleep(INDEX_REFRESH_S)  # the store is listed again at most this often
    r = _v1(url, steps=1, loras=[{"name": "fresh"}])
    assert r.status_code == 200, r.text


def test_metrics_count_cache_hits_and_patch_steps(served):
    url, _, log = served
    _v1(url, steps=1, loras=[{"name": "ink"}])
    text = requests.get(f"{url}/metrics", timeout=5).text
    assert 'swift_addon_cache_total{kind="lora",result="hit"}' in text
    assert 'swift_addon_cache_total{kind="controlnet",result="miss"}' in text
    assert "swift_lora_applied_from_step_bucket" in text
    assert "Traceback" not in log.read_text()


def test_the_baseline_kind_makes_the_same_image_as_swift_with_k_zero(served):
    from distillery.serving.swift_diffusion import BaselineDiffusionModel, SwiftDiffusionModel

    _, store, _ = served
    threads = torch.get_num_threads()
    images, reports = [], []
    try:
        for kind in (SwiftDiffusionModel, BaselineDiffusionModel):
            model = kind("swift", store.parent)
            model.check()
            model.addon_limits["wait_fraction"] = 0.0
            model.addon_limits["controlnet_cond_only"] = False  # both halves, as diffusers' ControlNet pipeline
            model.load_model()
            req = model._request(["a bright square"], {"steps": 2, "seed": 1, "loras": [{"name": "ink", "scale": 0.8}],
                                                       "controlnet": {"name": "edges", "image": EDGES}})
            ((png, report),) = model.run_batch(*model._batch(req))
            images.append(np.asarray(Image.open(io.BytesIO(png)), dtype=int))
            reports.append(report)
    finally:
        torch.set_num_threads(threads)
    assert reports[0]["controlnet"]["parallel"] and not reports[1]["controlnet"]["parallel"]
    assert np.abs(images[0] - images[1]).max() <= 1  # fuse_lora and ControlNet pipeline vs in-place patch and hooks


@pytest.mark.slow
def test_a_compiled_backbone_warms_up_at_load_and_makes_the_eager_image(served):
    from distillery.serving.swift_diffusion import SwiftDiffusionModel

    _, store, _ = served
    threads = torch.get_num_threads()
    images = []
    try:
        for compiled in (False, True):
            model = SwiftDiffusionModel("swift", store.parent)
            model.check()
            model.addon_limits.update(compile_backbone=compiled, wait_fraction=0.0)
            model.load_model()
            if compiled:  # the load compiled and ran what a request needs; the store's ControlNet is resident
                assert model.warmup_s > 0 and ("controlnet", "edges") in model.runtime.cache.keys()
            req = model._request(["a bright square"], {"steps": 2, "seed": 1, "loras": [{"name": "ink", "scale": 0.8}],
                                                       "controlnet": {"name": "edges", "image": EDGES}})
            ((png, report),) = model.run_batch(*model._batch(req))
            assert report["controlnet"]["compiled"] is compiled and report["controlnet"]["conditional_half_only"]
            images.append(np.asarray(Image.open(io.BytesIO(png)), dtype=int))
            model.runtime.close()
    finally:
        torch.set_num_threads(threads)
    assert np.abs(images[0] - images[1]).max() <= 1
    model = SwiftDiffusionModel("swift", store.parent)
    cfg = json.loads((store.parent / "distillery.json").read_text())
    try:
        (store.parent / "distillery.json").write_text(json.dumps({**cfg, "compile_backbone": True,
                                                                  "guidance_split": True}))
        with pytest.raises(ValueError, match="compile_backbone and guidance_split"):
            model.check()
    finally:
        (store.parent / "distillery.json").write_text(json.dumps(cfg))


def test_guidance_split_set_in_the_model_config_makes_the_same_image(served):
    from distillery.serving.swift_diffusion import SwiftDiffusionModel

    _, store, _ = served
    threads = torch.get_num_threads()
    images = []
    try:
        for split in (False, True):
            model = SwiftDiffusionModel("swift", store.parent)
            model.check()
            model.addon_limits["guidance_split"] = split
            model.addon_limits["wait_fraction"] = 0.0  # the LoRA from step 0 in both, whenever its fetch lands
            model.load_model()
            req = model._request(["a dark square"], {"steps": 2, "seed": 5, "guidance": 3.0,
                                                     "loras": [{"name": "ink", "scale": 0.8}]})
            ((png, report),) = model.run_batch(*model._batch(req))
            assert report["guidance_split"] is split
            images.append(np.asarray(Image.open(io.BytesIO(png)), dtype=int))
    finally:
        torch.set_num_threads(threads)
    assert np.abs(images[0] - images[1]).max() <= 1


def test_addons_come_from_the_object_store(served, s3, tmp_path):
    from distillery.platform import storage
    from distillery.serving.swift_diffusion import SwiftDiffusionModel

    _, store, _ = served
    storage.upload(store, "s3://bkt/addons")
    model_dir = tmp_path / "model"
    shutil.copytree(store.parent, model_dir, ignore=shutil.ignore_patterns("addons"))
    (model_dir / "distillery.json").write_text(json.dumps({"kind": "swift-diffusion", "default_steps": 2,
                                                           "addons_uri": "s3://bkt/addons"}))
    threads = torch.get_num_threads()
    try:
        model = SwiftDiffusionModel("swift", model_dir)
        model.check()
        model.load_model()
        req = model._request(["a dark square"], {"loras": [{"name": "bold"}],
                                                 "controlnet": {"name": "edges", "image": EDGES}})
        ((png, report),) = model.run_batch(*model._batch(req))
    finally:
        torch.set_num_threads(threads)
    assert png.startswith(b"\x89PNG") and report["loras"][0]["cache"] == "miss"
    assert report["controlnet"]["cache"] == "miss"
    with pytest.raises(Exception, match="unknown lora 'sepia'"):
        model._request(["x"], {"loras": [{"name": "sepia"}]})


# ------------------------------------------------------------------------ both kinds: tritonclient and fuzzing


def test_tritonclient_reads_the_metadata_and_infers_over_rest_binary_and_grpc(kind):
    import tritonclient.http as httpclient

    url, grpc_port = kind
    meta = _http(url).get_model_metadata("swift")
    assert_metadata_declared(meta)
    assert {"prompt", "lora_name", "control_image"} <= {i["name"] for i in meta["inputs"]}
    want = base64.b64decode(_v1(url, steps=2).json()["predictions"][0]["image_png_b64"])
    inputs = [httpclient.InferInput("prompt", [1], "BYTES"), httpclient.InferInput("steps", [1], "INT32"),
              httpclient.InferInput("seed", [1], "INT64")]
    for x, value in zip(inputs, (np.array([b"a bright square"], np.object_), np.array([2], np.int32),
                                 np.array([1], np.int64))):
        x.set_data_from_numpy(value, binary_data=True)
    out = _http(url).infer("swift", inputs, outputs=[httpclient.InferRequestedOutput("image", binary_data=True)])
    assert out.as_numpy("image")[0] == want
    r = _grpc(grpc_port, "swift", inputs=[{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["a square"]},
                                          {"name": "steps", "datatype": "INT32", "shape": [1], "data": [2]},
                                          {"name": "lora_name", "datatype": "BYTES", "shape": [1], "data": ["ink"]}])
    assert "error" not in r, r
    assert_metadata_declared(r["metadata"])
    assert base64.b64decode(r["outputs"]["image"][0]).startswith(b"\x89PNG")


SWIFT_FIELDS = {**SD_FIELDS, "steps": st.integers(-1, 12),
                "loras": st.lists(st.fixed_dictionaries({"name": st.sampled_from(["ink", "bold", "alien", "sepia"])},
                                                        optional={"scale": st.floats(-1, 3)}), max_size=3),
                "controlnet": st.fixed_dictionaries({"name": st.sampled_from(["edges", "canny"]),
                                                     "image": st.sampled_from([EDGES, _wrong_size(), "eA=="])},
                                                    optional={"scale": st.floats(-1, 3)})}
SWIFT_V2 = ["prompt", "steps", "guidance", "seed", "negative_prompt", "lora_name", "lora_scale", "controlnet",
            "control_image", "controlnet_scale"]


@FUZZ
@given(v1=_v1_bodies(SWIFT_FIELDS), v2=_v2_bodies(SWIFT_V2), headers=HEADERS, raw=RAW, which=st.booleans())
def test_fuzz_answers_4xx_never_5xx(kind, v1, v2, headers, raw, which):
    fuzz_model(kind[0], "swift", v1, v2, headers, raw, which)


def test_still_serves_after_fuzzing(kind):
    url, _ = kind
    assert requests.get(f"{url}/v2/health/ready", timeout=10).status_code == 200
    assert _v1(url, steps=1, loras=[{"name": "ink"}]).status_code == 200
