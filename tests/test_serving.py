"""The KServe predictor over HTTP on 127.0.0.1: V1, V2, malformed requests, metrics."""

from __future__ import annotations

import base64
import io
import socket
import subprocess
import sys
import time

import pytest
import requests
from PIL import Image

from distillery.models import tiny_sd

JSON = {"Content-Type": "application/json"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = tmp_path_factory.mktemp("model")
    tiny_sd.build_pipeline(tiny_sd.TinySDConfig()).save_pretrained(model)
    (model / "distillery.json").write_text('{"default_steps": 4, "max_steps": 20}')
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "distillery.serving", "--model-dir", str(model), "--model-name",
                             "tiny-sd", "--http-port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                break
        except requests.ConnectionError:
            time.sleep(0.2)
        if proc.poll() is not None:
            pytest.fail(f"server exited: {proc.stdout.read()[-3000:]}")
    else:
        proc.kill()
        pytest.fail("server not ready in 120 s")
    yield url, port
    proc.terminate()
    proc.wait(15)


def _png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_binds_loopback_only(server):
    _, port = server
    listening = open("/proc/net/tcp").read().splitlines()[1:]
    local = [line.split()[1] for line in listening if line.split()[3] == "0A"]  # 0A = LISTEN
    ours = [addr for addr in local if int(addr.split(":")[1], 16) == port]
    assert ours == ["0100007F:" + f"{port:04X}"], ours  # 127.0.0.1, not 0.0.0.0


def test_v1_predict_returns_deterministic_pngs_with_the_steps_asked(server):
    url, _ = server
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
    url, _ = server
    body = {"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [2], "data": ["a digit one", "a digit two"]}],
            "parameters": {"steps": 2, "seed": 1}}
    r = requests.post(f"{url}/v2/models/tiny-sd/infer", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["name"] == "image" and out["datatype"] == "BYTES" and out["shape"] == [2]
    assert all(_png(d).format == "PNG" for d in out["data"])
    assert r.json()["parameters"]["steps"] == 2


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
    ("v1", b"x" * (2 << 20), 413, "larger than"),
    ("v2", {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}, 400, "prompt"),
    ("v2", {"inputs": [{"name": "prompt", "datatype": "FP32", "shape": [1], "data": [1.0]}]}, 400, "BYTES"),
    ("v2", {"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [3], "data": ["x"]}]}, 400, "shape"),
    ("v2", {"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["x"]}],
            "parameters": {"steps": 0}}, 400, "steps"),
])
def test_malformed_requests_get_4xx_and_the_server_keeps_serving(server, path, body, status, words):
    url, _ = server
    target = f"{url}/v1/models/tiny-sd:predict" if path == "v1" else f"{url}/v2/models/tiny-sd/infer"
    data = body if isinstance(body, bytes) else __import__("json").dumps(body).encode()
    r = requests.post(target, data=data, headers=JSON, timeout=60)
    assert r.status_code == status, (r.status_code, r.text)
    assert words.lower() in r.text.lower(), r.text
    ok = requests.post(f"{url}/v1/models/tiny-sd:predict", json={"instances": [{"prompt": "x", "steps": 1}]}, timeout=60)
    assert ok.status_code == 200


def test_readiness_and_metrics(server):
    url, _ = server
    assert requests.get(f"{url}/v1/models/tiny-sd", timeout=5).json()["ready"] is True
    m = requests.get(f"{url}/metrics", timeout=5)
    assert m.status_code == 200 and "request_predict_seconds" in m.text
