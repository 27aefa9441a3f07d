"""A predictor process killed (SIGKILL: an OOM kill, a node lost) and started again on the same port, as the
pod's restart does: it comes up ready and serves the same model (same answers to the same requests)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

from distillery.models import tiny_sd

BODY = {"instances": [{"prompt": "a handwritten digit seven", "steps": 2, "guidance": 2.0, "seed": 11}]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(model_dir, port: int, log) -> subprocess.Popen:
    sink = log.open("a")
    proc = subprocess.Popen([sys.executable, "-m", "distillery.serving", "--model-dir", str(model_dir), "--model-name",
                             "tiny-sd", "--http-port", str(port)], stdout=sink, stderr=subprocess.STDOUT)
    sink.close()  # the child holds its own copy
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"predictor exited with {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                return proc
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    proc.kill()
    pytest.fail("predictor not ready in 120 s")


def _predict(url: str) -> dict:
    r = requests.post(f"{url}/v1/models/tiny-sd:predict", json=BODY, timeout=60)
    assert r.status_code == 200, r.text[:500]
    return r.json()["predictions"][0]


@pytest.mark.slow
def test_killed_predictor_comes_back_ready_with_the_same_model(tmp_path):
    model = tmp_path / "model"
    tiny_sd.build_pipeline(tiny_sd.TinySDConfig()).save_pretrained(model)
    (model / "distillery.json").write_text('{"default_steps": 2, "max_steps": 8}')
    port, log = _free_port(), tmp_path / "predictor.log"
    url = f"http://127.0.0.1:{port}"

    first = _start(model, port, log)
    try:
        before = _predict(url)
        metadata = requests.get(f"{url}/v2/models/tiny-sd", timeout=5).json()
        first.send_signal(signal.SIGKILL)
        assert first.wait(10) == -signal.SIGKILL
        with pytest.raises(requests.ConnectionError):  # gone at once: callers fail fast, nothing hangs
            requests.get(f"{url}/v2/health/live", timeout=2)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(10)

    second = _start(model, port, log)
    try:
        assert requests.get(f"{url}/v2/health/ready", timeout=5).status_code == 200
        assert requests.get(f"{url}/v1/models/tiny-sd", timeout=5).json()["ready"] is True
        assert requests.get(f"{url}/v2/models/tiny-sd", timeout=5).json() == metadata
        after = _predict(url)
        assert after["seed"] == before["seed"] == 11 and after["steps"] == before["steps"] == 2
        assert after["image_png_b64"] == before["image_png_b64"]  # the same weights, the same image
    finally:
        second.terminate()
        second.wait(15)
