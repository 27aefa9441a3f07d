"""What every predictor kind is held to, shared by the per-kind test files: property-based fuzzing of V1 and V2
bodies, headers and sizes (never a 5xx), and a third-party Open Inference Protocol client (tritonclient) over REST
and gRPC."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import requests
import tritonclient.http as httpclient
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st


def _grpc(port: int, model: str, op: str = "infer", inputs: list | None = None) -> dict:
    """tritonclient's gRPC client, run in its own process (see oip_grpc.py)."""
    req = {"target": f"127.0.0.1:{port}", "model": model, "op": op, "inputs": inputs or []}
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("oip_grpc.py"))], input=json.dumps(req),
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def _http(url: str) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(url.removeprefix("http://"), network_timeout=120, connection_timeout=120)


def assert_metadata_declared(meta: dict) -> None:
    """V2 model metadata (REST or gRPC as JSON) declares inputs and outputs, each with a datatype and a shape."""
    assert meta["inputs"] and meta["outputs"], meta
    for tensor in meta["inputs"] + meta["outputs"]:
        assert tensor["name"] and tensor["datatype"] and tensor["shape"], meta


# ------------------------------------------------------------------------------------------------ fuzzing

JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=4), max_leaves=12)
DATATYPES = st.sampled_from(["BYTES", "FP32", "FP64", "FP16", "INT32", "INT64", "UINT8", "BOOL", "fp32", "X"])
PARAMETERS = ("seed", "steps", "guidance", "binary_data_output", "x")


def _v1_bodies(fields: dict):
    instance = st.fixed_dictionaries({}, optional={k: v | JSON_VALUES for k, v in fields.items()})
    return st.one_of(JSON_VALUES.map(lambda v: {"instances": v}), st.builds(lambda i: {"instances": i},
                     st.lists(instance | JSON_VALUES, max_size=10)), JSON_VALUES)


def _v2_bodies(names: list[str], parameters: tuple[str, ...] = PARAMETERS):
    tensor = st.fixed_dictionaries({"name": st.sampled_from(names) | st.text(max_size=6), "datatype": DATATYPES,
                                    "shape": st.lists(st.integers(-2, 12) | st.integers(), max_size=4),
                                    "data": st.lists(st.floats(width=32) | st.integers(-5, 40) | st.text(max_size=8),
                                                     max_size=90) | JSON_VALUES})
    outputs = st.lists(st.fixed_dictionaries({"name": st.text(max_size=8)},
                                             optional={"parameters": st.dictionaries(st.text(max_size=8), JSON_VALUES)}),
                       max_size=2)
    return st.fixed_dictionaries({"inputs": st.lists(tensor, max_size=4) | JSON_VALUES},
                                 optional={"parameters": st.dictionaries(st.sampled_from(parameters), JSON_VALUES,
                                                                         max_size=3),
                                           "outputs": outputs, "id": JSON_VALUES})


HEADERS = st.fixed_dictionaries({}, optional={
    "Content-Type": st.sampled_from(["application/json", "application/x-www-form-urlencoded", "text/plain",
                                     "application/octet-stream", "application/cloudevents+json", "application/json; x"]),
    "Inference-Header-Content-Length": st.integers(-5, 5000).map(str) | st.text(max_size=5),
    "x-request-timeout": st.sampled_from(["30", "-1", "nan", "inf", "abc", "0"]),
    "ce-specversion": st.just("1.0")})
RAW = st.none() | st.binary(max_size=3000)  # a body that is not JSON at all, sent instead when given
SD_FIELDS = {"prompt": st.text(max_size=30), "steps": st.integers(-3, 25), "guidance": st.floats(-2, 30),
             "seed": st.integers(-3, 2**64), "negative_prompt": st.text(max_size=10)}  # text-to-image's V1 fields


def _fuzz(url: str, path: str, body, headers: dict, raw: bytes | None) -> None:
    data = raw if raw is not None else json.dumps(body).encode()
    # What an HTTP client can send at all: ASCII, no control characters, no leading or trailing whitespace.
    headers = {k: "".join(c for c in v.encode("ascii", "replace").decode() if c.isprintable()).strip()
               for k, v in headers.items()}
    r = requests.post(url + path, data=data, headers=headers, timeout=120)
    declared = r.status_code == 504 and "x-request-timeout" in headers
    assert r.status_code < 500 or declared, (r.status_code, r.text[:500], body if raw is None else raw[:200], headers)


def fuzz_model(url: str, model: str, v1, v2, headers: dict, raw: bytes | None, which: bool) -> None:
    """One fuzz example: the V1 body to :predict or the V2 body to /infer (or the raw bytes instead)."""
    if which:
        _fuzz(url, f"/v1/models/{model}:predict", v1, headers, raw)
    else:
        _fuzz(url, f"/v2/models/{model}/infer", v2, headers, raw)


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
