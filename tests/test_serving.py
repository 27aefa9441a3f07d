"""The KServe predictor over HTTP on 127.0.0.1: V1, V2, malformed requests, metrics."""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import subprocess
import sys
import time

import pytest
import requests
from PIL import Image

from distillery.models import tiny_sd
from distillery.serving import KINDS, register_kind, serve

JSON = {"Content-Type": "application/json"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir, name: str, log, env: dict | None = None, args: tuple = ()) -> tuple[subprocess.Popen, str, object]:
    """`python -m distillery.serving` on free loopback ports (HTTP; gRPC in `proc.grpc_port`), waited for until
    ready; output goes to the file `log` (a pipe nobody drains would fill and block the server)."""
    port, grpc_port = _free_port(), _free_port()
    sink = log.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "distillery.serving", "--model-dir", str(model_dir), "--model-name",
                             name, "--http-port", str(port), "--grpc-port", str(grpc_port), *args],
                            stdout=sink, stderr=subprocess.STDOUT, env=env)
    proc.grpc_port = grpc_port
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                return proc, url, sink
        except (requests.ConnectionError, requests.Timeout):  # not listening yet, or busy loading the model
            pass
        time.sleep(0.2)
        if proc.poll() is not None:
            pytest.fail(f"server exited: {log.read_text()[-3000:]}")
    proc.kill()
    pytest.fail("server not ready in 120 s")


def stop_server(proc: subprocess.Popen, sink) -> None:
    proc.terminate()
    proc.wait(15)
    sink.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = tmp_path_factory.mktemp("model")
    tiny_sd.build_pipeline(tiny_sd.TinySDConfig()).save_pretrained(model)
    (model / "distillery.json").write_text('{"default_steps": 4, "max_steps": 20}')
    log = tmp_path_factory.mktemp("log") / "server.log"
    proc, url, sink = start_server(model, "tiny-sd", log)
    yield url, int(url.rsplit(":", 1)[1]), log
    stop_server(proc, sink)


def _png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_binds_loopback_only(server):
    _, port, log = server
    listening = open("/proc/net/tcp").read().splitlines()[1:]
    local = [line.split()[1] for line in listening if line.split()[3] == "0A"]  # 0A = LISTEN
    ours = [addr for addr in local if int(addr.split(":")[1], 16) == port]
    assert ours == ["0100007F:" + f"{port:04X}"], ours  # 127.0.0.1, not 0.0.0.0
    assert f"Uvicorn running on http://127.0.0.1:{port}" in log.read_text()


def test_v1_predict_returns_deterministic_pngs_with_the_steps_asked(server):
    url, *_ = server
    body = {"instances": [{"prompt": "a handwritten digit seven", "steps": 3, "guidance": 2.0, "seed": 7},
                          {"prompt": "an emoji (flags)", "steps": 3, "guidance": 2.0, "seed": 7}]}
    r = requests.post(f"{url}/v1/models/tiny-sd:predict", json=body, timeout=60)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["steps"] for p in preds] == [3, 3] and [p["seed"] for p in preds] == [7, 8]
    assert all(_png(p["image_png_b64"]).size == (32, 32) for p in preds)
    again = requests.post(f"{url}/v1/models/tiny-sd:predict", json=body, timeout=60).json()["predictions"]
    assert again[0]["image_png_b64"] == preds[0]["image_png_b64"]
    default = requests.post(f"{url}/v1/models/tiny-sd:predict", json={"instances": [{"prompt": "x"}]}, timeout=60)
    assert default.json()["predictions"][0]["steps"] == 4  # the model folder's default


def test_v2_infer_returns_png_bytes(server):
    url, *_ = server
    body = {"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [2], "data": ["a digit one", "a digit two"]}],
            "parameters": {"steps": 2, "seed": 1}}
    r = requests.post(f"{url}/v2/models/tiny-sd/infer", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["name"] == "image" and out["datatype"] == "BYTES" and out["shape"] == [2]
    assert all(_png(d).format == "PNG" for d in out["data"])
    assert r.json()["parameters"]["steps"] == 2


def test_v2_options_as_inputs_and_raw_png_bytes_with_the_binary_extension(server):
    url, *_ = server
    body = {"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [2], "data": ["a digit one", "a digit two"]},
                       {"name": "steps", "datatype": "INT32", "shape": [1], "data": [3]},
                       {"name": "seed", "datatype": "INT64", "shape": [1], "data": [5]}],
            "parameters": {"binary_data_output": True}}
    r = requests.post(f"{url}/v2/models/tiny-sd/infer", json=body, timeout=60)
    assert r.status_code == 200, r.text[:300]
    header_len = int(r.headers["inference-header-content-length"])
    header, raw = json.loads(r.content[:header_len]), r.content[header_len:]
    assert header["parameters"] == {"steps": 3, "seed": 5}
    out = header["outputs"][0]
    assert out["shape"] == [2] and out["parameters"]["binary_data_size"] == len(raw) and "data" not in out
    pngs = []
    while raw:  # KServe/Triton BYTES layout: 4-byte little-endian length, then the bytes
        (n,) = struct.unpack("<I", raw[:4])
        pngs.append(raw[4:4 + n])
        raw = raw[4 + n:]
    assert len(pngs) == 2 and all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
    assert all(Image.open(io.BytesIO(p)).size == (32, 32) for p in pngs)
    # The same request in JSON form carries the very same images, base64-encoded.
    body["parameters"] = {}
    as_json = requests.post(f"{url}/v2/models/tiny-sd/infer", json=body, timeout=60).json()["outputs"][0]["data"]
    assert [base64.b64decode(d) for d in as_json] == pngs


def _chunked(total: int):
    for _ in range(0, total, 1 << 16):  # a generator body is sent chunked, without Content-Length
        yield b" " * (1 << 16)


@pytest.mark.parametrize("path,body,status,words", [
    ("v1", b"{not json", 400, "not valid JSON"),
    ("v1", {"instances": [{"steps": 2}]}, 400, "prompt"),
    ("v1", {"instances": [{"prompt": ""}]}, 400, "non-empty"),
    ("v1", {"instances": [{"prompt": 5}]}, 400, "string"),
    ("v1", {"instances": [{"prompt": "x", "steps": 500}]}, 400, "between 1 and 20"),
    ("v1", {"instances": [{"prompt": "x", "steps": 2.5}]}, 400, "integer"),
    ("v1", {"instances": [{"prompt": "x", "guidance": "high"}]}, 400, "number"),
    ("v1", {"instances": [{"prompt": "x"}] * 9}, 400, "too many prompts"),
    ("v1", {"instances": []}, 400, "empty"),
    ("v1", {"prompt": "x"}, 400, "instances"),
    ("v1", {"instances": [{"prompt": "x", "color": "red"}]}, 400, "unknown field"),
    ("v1", {"instances": [{"prompt": "x", "guidance": 1000}]}, 400, "between 1.0 and 20.0"),
    ("v1", {"instances": [{"prompt": "x", "seed": -1}]}, 400, "seed"),
    ("v1", {"instances": [["x"]]}, 400, "object"),
    ("v1", b"x" * (2 << 20), 413, "larger than"),
    ("v1", "chunked", 413, "larger than"),
    ("v2", {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}, 400, "prompt"),
    ("v2", {"inputs": [{"name": "prompt", "datatype": "FP32", "shape": [1], "data": [1.0]}]}, 400, "BYTES"),
    ("v2", {"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [3], "data": ["x"]}]}, 400, "shape"),
    ("v2", {"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["x"]}],
            "parameters": {"steps": 0}}, 400, "steps"),
    ("v2", {"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [9], "data": ["x"] * 9}]}, 400, "too many"),
    ("v2", {"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["x"]}],
            "outputs": [{"name": "latents"}]}, 400, "unknown output"),
    ("v2", {"inputs": "x"}, 422, "inputs"),
])
def test_malformed_requests_get_4xx_and_the_server_keeps_serving(server, path, body, status, words):
    url, *_ = server
    target = f"{url}/v1/models/tiny-sd:predict" if path == "v1" else f"{url}/v2/models/tiny-sd/infer"
    data = _chunked(2 << 20) if body == "chunked" else body if isinstance(body, bytes) else json.dumps(body).encode()
    r = requests.post(target, data=data, headers=JSON, timeout=60)
    assert r.status_code == status, (r.status_code, r.text)
    assert words.lower() in r.text.lower(), r.text
    ok = requests.post(f"{url}/v1/models/tiny-sd:predict", json={"instances": [{"prompt": "x", "steps": 1}]}, timeout=60)
    assert ok.status_code == 200


def test_readiness_metrics_and_quiet_client_errors(server):
    url, _, log = server
    requests.post(f"{url}/v1/models/tiny-sd:predict", json={"instances": [{"prompt": "x", "steps": 0}]}, timeout=60)
    text = log.read_text()
    assert "400 POST /v1/models/tiny-sd:predict: 'steps' must be between" in text and "Traceback" not in text
    assert requests.get(f"{url}/v1/models/tiny-sd", timeout=5).json()["ready"] is True
    m = requests.get(f"{url}/metrics", timeout=5)
    assert m.status_code == 200 and "request_predict_seconds" in m.text


def test_kind_registry_and_clear_errors(tmp_path):
    from distillery.serving.text_to_image import TextToImageModel

    assert KINDS["text-to-image"] is TextToImageModel
    with pytest.raises(ValueError, match="unknown predictor kind 'robot'.*policy.*text-to-image"):
        serve(tmp_path, "m", kind="robot")

    @register_kind("echo-test")
    class Echo:
        def __init__(self, name, model_dir):
            raise RuntimeError(f"built {name} from {model_dir}")

    try:
        with pytest.raises(RuntimeError, match="built m from"):
            serve(tmp_path, "m", kind="echo-test")
    finally:
        KINDS.pop("echo-test")
    with pytest.raises(FileNotFoundError, match="neither a saved policy .* nor a diffusers pipeline"):
        serve(tmp_path, "m")  # kind "auto" reads the folder first
    with pytest.raises(FileNotFoundError, match="not a diffusers pipeline folder"):
        serve(tmp_path, "m", kind="text-to-image")
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "distillery.json").write_text('{"default_steps": 30, "max_steps": 20}')
    with pytest.raises(ValueError, match="default_steps must be between 1 and max_steps"):
        serve(tmp_path, "m")
