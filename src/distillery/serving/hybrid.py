"""Hybrid SD predictors over the V2 (Open Inference) protocol: the cloud runs the first k steps with the large model,
the edge continues from the latents and scheduler position it returned with the small model and the tiny VAE.

cloud  POST /v2/models/NAME/infer  input "prompt" (BYTES, [n]); parameters seed, steps, split (optional)
       -> "latents" FP32 [n, C, H, W], "model_outputs" FP32 [m, n, C, H, W] (the solver's history, m <= order),
          "step_index" INT64 [1], "lower_order_nums" INT64 [1], "steps" INT64 [1], "guidance" FP32 [1]
edge   POST /v2/models/NAME/infer  the prompt plus every cloud output above as inputs
       -> "image" (BYTES, [n]: base64 PNG in JSON, the PNG bytes with the binary extension and over gRPC) and the
          final "latents" FP32 [n, C, H, W]

Both load one release folder (`cloud/`, `edge/`, `hybrid.json`); each loads only its own half. JSON, binary tensor
data and gRPC all work. A request that does not fit (wrong shapes, a step out of range, NaN) is answered 400 before
any model runs.
"""

from __future__ import annotations

import base64
import math
import threading
from pathlib import Path
from typing import Any

import kserve
import numpy as np
from kserve.errors import InvalidInput

from distillery.serving.batching import deadline_from
from distillery.serving.server import ServedModel, binary_output, register_kind, v2_array, v2_parameters
from distillery.serving.text_to_image import _text, png_bytes

MAX_BATCH = 8
MAX_PROMPT_CHARS = 500
STATE_INPUTS = ("latents", "model_outputs", "step_index", "lower_order_nums", "steps", "guidance")


def _prompts(by_name: dict) -> list[str]:
    if "prompt" not in by_name:
        raise InvalidInput("V2 request needs an input named 'prompt' (datatype BYTES)")
    p = by_name["prompt"]
    try:
        data = v2_array(p, ("BYTES",)).tolist() if len(p.shape) == 1 else []
    except InvalidInput:  # the values do not fit the shape: said below
        data = p.data if isinstance(p.data, list) else []
    if p.datatype != "BYTES" or len(p.shape) != 1 or p.shape[0] != len(data) or not data:
        raise InvalidInput(f"input 'prompt' must be BYTES with shape [n] matching its values, got {p.datatype} "
                           f"{p.shape} with {len(data)} values")
    prompts = [_text(d, "prompt") for d in data]
    if len(prompts) > MAX_BATCH:
        raise InvalidInput(f"too many prompts: {len(prompts)} > {MAX_BATCH} per request")
    if not all(isinstance(x, str) and x.strip() and len(x) <= MAX_PROMPT_CHARS for x in prompts):
        raise InvalidInput(f"every prompt must be a non-empty string of at most {MAX_PROMPT_CHARS} characters")
    return prompts


def _int(value: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not (isinstance(value, int) or isinstance(value, float) and value.is_integer()):
        raise InvalidInput(f"'{name}' must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise InvalidInput(f"'{name}' must be between {lo} and {hi}, got {value!r}")
    return int(value)


def _tensor(by_name: dict, name: str, datatype: str, rank: int | None = None) -> np.ndarray:
    if name not in by_name:
        raise InvalidInput(f"missing input '{name}' (send every output of the cloud predictor)")
    inp = by_name[name]
    if inp.datatype != datatype:
        raise InvalidInput(f"input '{name}' must have datatype {datatype}, got {inp.datatype}")
    shape = [int(s) for s in inp.shape]
    if rank is not None and len(shape) != rank:
        raise InvalidInput(f"input '{name}' must have {rank} dimensions, got shape {shape}")
    try:
        arr = np.asarray(inp.as_numpy(), dtype=np.float32 if datatype == "FP32" else np.int64)
    except Exception as e:  # a value count that does not fit the shape
        raise InvalidInput(f"input '{name}': {e}") from None
    if list(arr.shape) != shape:
        raise InvalidInput(f"input '{name}' holds {arr.size} values, not shape {shape}")
    if datatype == "FP32" and not np.isfinite(arr).all():
        raise InvalidInput(f"input '{name}' contains NaN or infinite values")
    return arr


def _scalar(by_name: dict, name: str, datatype: str) -> Any:
    arr = _tensor(by_name, name, datatype, 1)
    if arr.shape != (1,):
        raise InvalidInput(f"input '{name}' must hold exactly one value (shape [1]), got shape {list(arr.shape)}")
    return arr[0].item()


class _HybridModel(ServedModel):
    # One request per model call: a request is one trajectory (its own steps, split, seeds and, at the edge, solver
    # state), and a hybrid client already sends all its prompts in one request.
    max_items = 1
    OUTPUTS: tuple[str, ...] = ()

    def __init__(self, name: str, model_dir: Path, **batching):
        super().__init__(name, model_dir, **batching)
        self.pipe, self.config = None, {}
        self._lock = threading.Lock()

    def check(self) -> None:
        self._load_config()

    def _load_config(self):
        from distillery.papers.hybrid_sd.release import load_config

        self.config = load_config(self.model_dir)
        self.steps, self.split = int(self.config["steps"]), int(self.config["split"])
        self.guidance = float(self.config["guidance_scale"])

    @property
    def _latent_dims(self) -> list[int]:
        c = self.pipe.unet.config
        return [int(c.in_channels), int(c.sample_size), int(c.sample_size)]

    def _request(self, by_name: dict, params: dict) -> dict:
        """The request checked and converted, before it is queued."""
        raise NotImplementedError

    async def predict(self, payload: Any, headers: dict | None = None, response_headers: dict | None = None):
        if not isinstance(payload, kserve.InferRequest):
            raise InvalidInput("the hybrid predictors speak V2 only: POST /v2/models/NAME/infer")
        unknown = [o.name for o in payload.request_outputs or [] if o.name not in self.OUTPUTS]
        if unknown:
            raise InvalidInput(f"unknown output(s) {unknown}; this model has {', '.join(self.OUTPUTS)}")
        req = self._request({i.name: i for i in payload.inputs}, v2_parameters(payload))
        (arrays,) = await self.batcher.submit(None, [req], deadline_from(headers))
        return kserve.InferResponse(model_name=self.name, infer_outputs=_outputs(arrays, payload),
                                    response_id=payload.id or "", use_binary_outputs=payload.from_grpc
                                    or payload.use_binary_outputs, requested_outputs=payload.request_outputs)


def _outputs(arrays: dict, request: kserve.InferRequest) -> list:
    """numpy arrays as V2 outputs; PNGs (a list of bytes) as BYTES: base64 text in JSON, raw bytes otherwise. Over
    gRPC every output is made raw here: KServe's to_grpc would leave an empty one (the cloud's history at split 0)
    out of the raw list and shift the outputs after it."""
    outputs = []
    for name, value in arrays.items():
        parameters = None
        if isinstance(value, list):
            binary = binary_output(request, name)
            value = np.array(value if binary else [base64.b64encode(v) for v in value], dtype=np.object_)
            parameters = {"content_type": "image/png" if binary else "image/png;base64"}
        datatype = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}.get(value.dtype, "BYTES")
        out = kserve.InferOutput(name=name, datatype=datatype, shape=list(value.shape), data=value,
                                 parameters=parameters)
        if request.from_grpc:
            out.set_data_from_numpy(value, binary_data=True)
        outputs.append(out)
    return outputs


def _fp32(arr) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(arr, dtype=np.float32))


def _int64(value: int) -> np.ndarray:
    return np.array([int(value)], dtype=np.int64)


@register_kind("hybrid-cloud")
class CloudModel(_HybridModel):
    """The first k steps with the large model; returns where the trajectory stands."""

    OUTPUTS = STATE_INPUTS

    def load_model(self) -> None:
        from distillery.papers.hybrid_sd.release import load_cloud

        self._load_config()
        self.pipe = load_cloud(self.model_dir)

    def get_input_types(self) -> list[dict]:
        return [{"name": "prompt", "datatype": "BYTES", "shape": [-1]}]

    def get_output_types(self) -> list[dict]:
        return _state_types(self._latent_dims)

    def _request(self, by_name: dict, params: dict) -> dict:
        prompts = _prompts(by_name)
        if set(by_name) != {"prompt"}:
            raise InvalidInput(f"unknown input(s) {sorted(set(by_name) - {'prompt'})}; the cloud takes 'prompt', "
                               f"and seed, steps and split as parameters")
        unknown = set(params) - {"seed", "steps", "split"}
        if unknown:
            raise InvalidInput(f"unknown parameter(s) {sorted(unknown)}; allowed: seed, steps, split")
        steps = _int(params.get("steps", self.steps), "steps", 1, 200)
        split = _int(params.get("split", self.split if "steps" not in params else round(0.4 * steps)), "split", 0,
                     steps)
        seed = _int(params.get("seed", 0), "seed", 0, 2**62)
        return {"prompts": prompts, "seeds": [seed + i for i in range(len(prompts))], "steps": steps, "split": split}

    def run_batch(self, key: None, items: list[dict]) -> list[dict]:
        import torch

        from distillery.papers.hybrid_sd import sampler

        (req,) = items
        with self._lock, torch.inference_mode():
            latents, state = sampler.run_first(self.pipe, self.pipe.unet, req["prompts"], req["seeds"],
                                               steps=req["steps"], k=req["split"], guidance_scale=self.guidance)
        history = state.model_outputs if state.model_outputs is not None else torch.zeros((0, *latents.shape))
        return [{"latents": _fp32(latents.numpy()), "model_outputs": _fp32(history.numpy()),
                 "step_index": _int64(state.step_index), "lower_order_nums": _int64(state.lower_order_nums),
                 "steps": _int64(req["steps"]), "guidance": _fp32([self.guidance])}]


def _state_types(dims: list[int]) -> list[dict]:
    """What the cloud returns and the edge takes besides the prompt."""
    return [{"name": "latents", "datatype": "FP32", "shape": [-1, *dims]},
            {"name": "model_outputs", "datatype": "FP32", "shape": [-1, -1, *dims]},
            {"name": "step_index", "datatype": "INT64", "shape": [1]},
            {"name": "lower_order_nums", "datatype": "INT64", "shape": [1]},
            {"name": "steps", "datatype": "INT64", "shape": [1]},
            {"name": "guidance", "datatype": "FP32", "shape": [1]}]


@register_kind("hybrid-edge")
class EdgeModel(_HybridModel):
    """Continues a trajectory from the cloud's latents and scheduler state with the small UNet; decodes with the
    tiny VAE."""

    OUTPUTS = ("image", "latents")

    def load_model(self) -> None:
        from distillery.papers.hybrid_sd.release import load_edge

        self._load_config()
        self.pipe = load_edge(self.model_dir)
        self.latent_shape = tuple(self._latent_dims)

    def get_input_types(self) -> list[dict]:
        return [{"name": "prompt", "datatype": "BYTES", "shape": [-1]}, *_state_types(self._latent_dims)]

    def get_output_types(self) -> list[dict]:
        return [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                {"name": "latents", "datatype": "FP32", "shape": [-1, *self._latent_dims]}]

    def _request(self, by_name: dict, params: dict) -> dict:
        if params:
            raise InvalidInput(f"the edge takes no parameters, got {sorted(params)}; send the cloud's outputs as inputs")
        prompts = _prompts(by_name)
        unknown = set(by_name) - {"prompt", *STATE_INPUTS}
        if unknown:
            raise InvalidInput(f"unknown input(s) {sorted(unknown)}; expected prompt, {', '.join(STATE_INPUTS)}")
        latents = _tensor(by_name, "latents", "FP32", 4)
        if tuple(latents.shape) != (len(prompts), *self.latent_shape):
            raise InvalidInput(f"'latents' must have shape {[len(prompts), *self.latent_shape]} (one per prompt), "
                               f"got {list(latents.shape)}")
        history = _tensor(by_name, "model_outputs", "FP32", 5)
        steps = _int(_scalar(by_name, "steps", "INT64"), "steps", 1, 200)
        step_index = _int(_scalar(by_name, "step_index", "INT64"), "step_index", 0, steps)
        lower = _int(_scalar(by_name, "lower_order_nums", "INT64"), "lower_order_nums", 0, 16)
        guidance = float(_scalar(by_name, "guidance", "FP32"))
        if not math.isclose(guidance, self.guidance, rel_tol=1e-6):
            raise InvalidInput(f"'guidance' {guidance} differs from this release's {self.guidance}: the two halves of "
                               f"one trajectory must guide alike")
        return {"prompts": prompts, "latents": latents, "history": history, "steps": steps, "step_index": step_index,
                "lower_order_nums": lower, "guidance": guidance}

    def run_batch(self, key: None, items: list[dict]) -> list[dict]:
        import torch
        from PIL import Image

        from distillery.papers.hybrid_sd import sampler

        (req,) = items
        history = req["history"]
        state = sampler.SchedulerState(req["step_index"], req["lower_order_nums"],
                                       torch.from_numpy(history) if len(history) else None)
        with self._lock, torch.inference_mode():
            try:
                final = sampler.run_rest(self.pipe, self.pipe.unet, req["prompts"], torch.from_numpy(req["latents"]),
                                         state, steps=req["steps"], guidance_scale=req["guidance"])
            except ValueError as e:  # SchedulerState.check: the state does not fit this trajectory
                raise InvalidInput(str(e)) from None
            images = sampler.decode(self.pipe.vae, final)
        return [{"image": [png_bytes(Image.fromarray(img)) for img in images], "latents": _fp32(final.numpy())}]


def edge_client(cloud_url: str, model_name: str, release_dir: Path, prompts: list[str], seed: int = 0,
                timeout: float = 300.0) -> tuple[np.ndarray, dict]:
    """A local edge (what `distillery edge` runs): ask the cloud predictor for the first k steps, continue them here
    with the release's small UNet and tiny VAE. Returns uint8 images and what moved: bytes and seconds."""
    import time

    import requests
    import torch

    from distillery.papers.hybrid_sd import sampler
    from distillery.papers.hybrid_sd.release import load_config, load_edge

    load_config(release_dir)
    pipe = load_edge(release_dir)
    t0 = time.perf_counter()
    r = requests.post(f"{cloud_url.rstrip('/')}/v2/models/{model_name}/infer", timeout=timeout,
                      json={"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [len(prompts)],
                                        "data": list(prompts)}], "parameters": {"seed": int(seed)}})
    if r.status_code != 200:
        raise RuntimeError(f"the cloud predictor answered {r.status_code}: {r.text[:500]}")
    t_cloud = time.perf_counter() - t0
    out = {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in r.json()["outputs"]}
    history = torch.from_numpy(out["model_outputs"].astype(np.float32))
    state = sampler.SchedulerState(int(out["step_index"][0]), int(out["lower_order_nums"][0]),
                                   history if len(history) else None)
    with torch.inference_mode():
        final = sampler.run_rest(pipe, pipe.unet, list(prompts), torch.from_numpy(out["latents"].astype(np.float32)),
                                 state, steps=int(out["steps"][0]), guidance_scale=float(out["guidance"][0]))
        images = sampler.decode(pipe.vae, final)
    return images, {"cloud_s": t_cloud, "total_s": time.perf_counter() - t0, "bytes_from_cloud": len(r.content),
                    "split": state.step_index, "steps": int(out["steps"][0])}
