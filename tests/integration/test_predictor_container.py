"""The predictor as KServe runs it: the rendered InferenceService's container (the ServingRuntime's command and
args, the model's image, args and securityContext) in the built image with podman, the model fetched from its
s3:// storageUri into /mnt/models by KServe's own storage initializer (kserve-storage, in a venv of its own as
in its own container). Also the `pvc://` case: a model folder another uid trained, mounted read-only."""

from __future__ import annotations

import base64
import io
import socket
import subprocess
import time
import uuid

import numpy as np
import pytest
import requests
import yaml
from PIL import Image as PILImage

from integration.containers import REPO, podman

pytestmark = pytest.mark.slow

STORAGE_INITIALIZER = REPO / "build" / "container" / "storage-initializer" / "bin" / "python"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _container_spec(isvc: dict) -> dict:
    """What KServe runs for this InferenceService: the ServingRuntime's container with the model's fields merged
    in (image, args appended, env, securityContext)."""
    runtime = yaml.safe_load((REPO / "manifests" / "base" / "servingruntime.yaml").read_text())
    assert isvc["spec"]["predictor"]["model"]["runtime"] == runtime["metadata"]["name"]
    c = runtime["spec"]["containers"][0]
    model = isvc["spec"]["predictor"]["model"]
    name = isvc["metadata"]["name"]
    return {"image": model["image"], "command": c["command"],
            "args": [a.replace("{{.Name}}", name) for a in c["args"]] + model.get("args", []),
            "env": {e["name"]: e["value"] for e in c.get("env", []) + model.get("env", [])},
            "securityContext": {**c.get("securityContext", {}), **model.get("securityContext", {})},
            "podSecurityContext": isvc["spec"]["predictor"].get("securityContext", {})}


def _run_predictor(spec: dict, model_dir, port: int) -> str:
    """podman run of the container spec. Two deliberate differences from a pod: the host network (so --host is
    127.0.0.1, not the pod's 0.0.0.0) and free ports instead of 8080 and 8081."""
    sc = spec["securityContext"]
    args = [a for a in spec["args"] if not a.startswith(("--host=", "--http-port=", "--grpc-port="))]
    args += ["--host=127.0.0.1", f"--http-port={port}", f"--grpc-port={_free_port()}"]
    name = f"predictor-{uuid.uuid4().hex[:8]}"
    cmd = ["run", "-d", "--name", name, "--user", str(sc["runAsUser"]),
           "--group-add", str(spec["podSecurityContext"].get("fsGroup", sc["runAsUser"])),
           "-v", f"{model_dir}:/mnt/models:ro"]
    if sc.get("allowPrivilegeEscalation") is False:
        cmd += ["--security-opt", "no-new-privileges"]
    for cap in sc.get("capabilities", {}).get("drop", []):
        cmd += ["--cap-drop", cap]
    for k, v in spec["env"].items():
        cmd += ["-e", f"{k}={v}"]
    podman(*cmd, "--entrypoint", spec["command"][0], spec["image"], *spec["command"][1:], *args)
    return name


def _wait_ready(name: str, url: str, timeout: float = 180) -> float:
    start = time.time()
    while time.time() - start < timeout:
        try:
            if requests.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return time.time() - start
        except requests.ConnectionError:
            pass
        state = podman("inspect", "--format", "{{.State.Status}}", name, check=False).stdout.strip()
        if state not in ("running", "created", "configured"):
            pytest.fail(f"predictor container {state}: {podman('logs', name, check=False).stderr[-3000:]}")
        time.sleep(0.5)
    pytest.fail(f"predictor not ready in {timeout} s: {podman('logs', name, check=False).stderr[-3000:]}")


def _check_serves(url: str, name: str) -> None:
    v1 = requests.post(f"{url}/v1/models/{name}:predict",
                       json={"instances": [{"prompt": "a bright square", "steps": 2, "seed": 3}]}, timeout=120)
    assert v1.status_code == 200, v1.text
    png = PILImage.open(io.BytesIO(base64.b64decode(v1.json()["predictions"][0]["image_png_b64"])))
    assert png.format == "PNG" and png.size == (16, 16)
    v2 = requests.post(f"{url}/v2/models/{name}/infer", timeout=120, json={
        "inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["a dark square"]}],
        "parameters": {"steps": 2}})
    assert v2.status_code == 200, v2.text
    assert v2.json()["outputs"][0]["shape"] == [1]
    metrics = requests.get(f"{url}/metrics", timeout=10)
    assert metrics.status_code == 200 and "request" in metrics.text


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory):
    """A 2-step tiny-sd trained by this (root) process with the project's own training code: its weight files
    come from safetensors' private temp-file writes, so they are readable by uid 1000 only if saving opens them."""
    from distillery.models import tiny_sd

    cfg = tiny_sd.TinySDConfig(resolution=16, vae_channels=(8, 16, 16), vae_norm_groups=4, unet_channels=(16, 32),
                               norm_groups=8)

    class Data:
        images = np.concatenate([np.full((8, 16, 16, 3), 230, np.uint8), np.full((8, 16, 16, 3), 25, np.uint8)])
        captions = ["a bright square"] * 8 + ["a dark square"] * 8
        labels = np.array([0] * 8 + [1] * 8)

    root = tmp_path_factory.mktemp("trained")
    tiny_sd.train_vae(Data(), root / "vae", cfg=cfg, steps=2, batch_size=8)
    tiny_sd.train_unet(Data(), root / "vae", root / "model", cfg=cfg, steps=2, batch_size=8)
    root.chmod(0o755)
    return root / "model"


def _serve_and_check(image, isvc: dict, model_dir) -> float:
    spec = _container_spec(isvc)
    assert spec["image"] == image.ref and spec["securityContext"]["runAsUser"] == 1000
    assert spec["securityContext"]["runAsNonRoot"] is True
    port = _free_port()
    name = _run_predictor(spec, model_dir, port)
    try:
        url = f"http://127.0.0.1:{port}"
        ready_s = _wait_ready(name, url)
        # The server process's real uid, read from the host (`podman exec` needs rlimits this sandbox refuses).
        pid = podman("inspect", "--format", "{{.State.Pid}}", name).stdout.strip()
        uids = next(line for line in open(f"/proc/{pid}/status") if line.startswith("Uid:")).split()[1:]
        assert set(uids) == {"1000"}, uids
        _check_serves(url, isvc["metadata"]["name"])
        return ready_s
    finally:
        podman("rm", "-f", name, check=False)


def test_predictor_container_serves_the_model_from_its_s3_storage_uri(image, s3_env, s3, trained_model, tmp_path):
    from distillery.platform import k8s, storage

    uri = f"s3://{s3.bucket}/models/tiny-sd/1/model"
    storage.upload(trained_model, uri)
    isvc = k8s.render_inference_service("tiny-sd", uri, image=image.ref, args=["--kind", "text-to-image"])
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == uri
    # The storage initializer: KServe's own code, credentials and endpoint from the environment as its Secret gives.
    mnt = tmp_path / "mnt-models"
    mnt.mkdir()
    env = {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key,
           "AWS_ENDPOINT_URL": s3.endpoint_url, "S3_ENDPOINT": s3.endpoint_url.split("://", 1)[1],
           "S3_USE_HTTPS": "0", "S3_VERIFY_SSL": "0", "AWS_DEFAULT_REGION": "us-east-1", "PATH": "/usr/bin:/bin"}
    init = subprocess.run([str(STORAGE_INITIALIZER), "-c", "import sys; from kserve_storage import Storage; "
                           "print(Storage.download(sys.argv[1], sys.argv[2]))", uri, str(mnt)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert init.returncode == 0, init.stderr[-3000:]
    assert (mnt / "model_index.json").exists() and list(mnt.rglob("*.safetensors"))
    ready_s = _serve_and_check(image, isvc, mnt)
    print(f"predictor (storageUri) ready {ready_s:.1f} s after podman run")


def test_predictor_container_serves_a_mounted_folder_another_uid_wrote(image, trained_model):
    from distillery.platform import k8s

    weights = list(trained_model.rglob("*.safetensors"))
    assert weights and all(w.stat().st_uid == 0 and w.stat().st_mode & 0o004 for w in weights)
    isvc = k8s.render_inference_service("tiny-sd", f"pvc://models/tiny-sd", image=image.ref,
                                        args=["--kind", "text-to-image"])
    ready_s = _serve_and_check(image, isvc, trained_model)
    print(f"predictor (pvc) ready {ready_s:.1f} s after podman run")


COMPILE_CHECK = """
import torch
conv = torch.nn.Conv2d(4, 8, 3, padding=1).eval()
step = lambda x: torch.nn.functional.group_norm(torch.nn.functional.silu(conv(x)), 4)
x = torch.randn(2, 4, 8, 8)
with torch.inference_mode():
    eager, compiled = step(x), torch.compile(step, dynamic=False)(x)
torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
print("compiled")
"""


def test_torch_compile_builds_its_cpu_kernels_in_the_image(image):
    """The SwiftDiffusion predictor's compile_backbone: inductor writes C++ kernels and builds them with the image's
    compiler against Python.h, as the pod's user with only /tmp to write to."""
    out = podman("run", "--rm", "--user", "1000", "-e", "HOME=/tmp", "-e", "TORCHINDUCTOR_CACHE_DIR=/tmp/inductor",
                 "--entrypoint", "python", image.ref, "-c", COMPILE_CHECK, timeout=300, check=False)
    assert out.returncode == 0 and out.stdout.strip().endswith("compiled"), out.stderr[-3000:]
