"""Hybrid SD predictors over the V2 (Open Inference) protocol: the cloud runs the first k steps with the large model,
the edge continues from the latents and scheduler position it returned with the small model and the tiny VAE.

cloud  POST /v2/models/NAME/infer  input "prompt" (BYTES, [n]); parameters seed, steps, split (optional)
       -> "latents" FP32 [n, C, H, W], "model_outputs" FP32 [m, n, C, H, W] (the solver's history, m <= order),
          "step_index" INT64 [1], "lower_order_nums" INT64 [1], "steps" INT64 [1], "guidance" FP32 [1]
edge   POST /v2/models/NAME/infer  the prompt plus every cloud output above as inputs
       -> "image" (BYTES, [n], base64 PNG) and the final "latents" FP32 [n, C, H, W]

Both load one release folder (`cloud/`, `edge/`, `hybrid.json`); each loads only its own half. A request that does
not fit (wrong shapes, a step out of range, NaN) is answered 400 before any model runs.
"""

from __future__ import annotations

import asyncio
import base64
import io
import math
import threading
from pathlib import Path
from typing import Any

import kserve
import numpy as np
from kserve.errors import InvalidInput

from distillery.serving.server import register_kind

MAX_BATCH = 8
MAX_PROMPT_CHARS = 500
STATE_INPUTS = ("latents", "model_outputs", "step_index", "lower_order_nums", "steps", "guidance")


def _prompts(by_name: dict) -> list[str]:
    if "prompt" not in by_name:
        raise InvalidInput("V2 request needs an input named 'prompt' (datatype BYTES)")
    p = by_name["prompt"]
    data = p.data if isinstance(p.data, list) else []
    if p.datatype != "BYTES" or len(p.shape) != 1 or p.shape[0] != len(data) or not data:
        raise InvalidInput(f"input 'prompt' must be BYTES with shape [n] matching its values, got {p.datatype} "
                           f"{p.shape} with {len(data)} values")
    prompts = [d.decode() if isinstance(d, bytes) else d for d in data]
    if len(prompts) > MAX_BATCH:
        raise InvalidInput(f"too many prompts: {len(prompts)} > {MAX_BATCH} per request")
    if not all(isinstance(x, str) and x.strip() and len(x) <= MAX_PROMPT_CHARS for x in prompts):
        raise InvalidInput(f"every prompt must be a non-empty string of at most {MAX_PROMPT_CHARS} characters")
    return prompts


def _int(value: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise InvalidInput(f"'{name}' must be an integer, got {value!r}")
    if not lo <= int(value) <= hi:
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


class _HybridModel(kserve.Model):
    def __init__(self, name: str, model_dir: Path):
        super().__init__(name)
        self.model_dir = Path(model_dir)
        self.pipe, self.config = None, {}
        self._lock = threading.Lock()

    def _load_config(self):
        from distillery.papers.hybrid_sd.release import load_config

        self.config = load_config(self.model_dir)
        self.steps, self.split = int(self.config["steps"]), int(self.config["split"])
        self.guidance = float(self.config["guidance_scale"])

    async def predict(self, payload: Any, headers: dict | None = None, response_headers: dict | None = None):
        if not isinstance(payload, kserve.InferRequest):
            raise InvalidInput("the hybrid predictors speak V2 only: POST /v2/models/NAME/infer")
        by_name = {i.name: i for i in payload.inputs}
        outputs = await asyncio.get_running_loop().run_in_executor(None, self._run, by_name,
                                                                   dict(payload.parameters or {}))
        return kserve.InferResponse(model_name=self.name, infer_outputs=outputs, response_id=payload.id or "")


def _fp32(name: str, arr) -> kserve.InferOutput:
    arr = np.ascontiguousarray(np.asarray(arr, dtype=np.float32))
    return kserve.InferOutput(name=name, datatype="FP32", shape=list(arr.shape), data=arr.flatten().tolist())


def _int64(name: str, value: int) -> kserve.InferOutput:
    return kserve.InferOutput(name=name, datatype="INT64", shape=[1], data=[int(value)])


@register_kind("hybrid-cloud")
class CloudModel(_HybridModel):
    """The first k steps with the large model; returns where the trajectory stands."""

    def load(self) -> bool:
        from distillery.papers.hybrid_sd.release import load_cloud

        self._load_config()
        self.pipe = load_cloud(self.model_dir)
        self.ready = True
        return True

    def _run(self, by_name: dict, params: dict) -> list:
        import torch

        from distillery.papers.hybrid_sd import sampler

        prompts = _prompts(by_name)
        unknown = set(params) - {"seed", "steps", "split"}
        if unknown:
            raise InvalidInput(f"unknown parameter(s) {sorted(unknown)}; allowed: seed, steps, split")
        steps = _int(params.get("steps", self.steps), "steps", 1, 200)
        split = _int(params.get("split", self.split if "steps" not in params else round(0.4 * steps)), "split", 0,
                     steps)
        seed = _int(params.get("seed", 0), "seed", 0, 2**62)
        with self._lock, torch.inference_mode():
            latents, state = sampler.run_first(self.pipe, self.pipe.unet, prompts,
                                               [seed + i for i in range(len(prompts))], steps=steps, k=split,
                                               guidance_scale=self.guidance)
        history = state.model_outputs if state.model_outputs is not None else torch.zeros((0, *latents.shape))
        return [_fp32("latents", latents.numpy()), _fp32("model_outputs", history.numpy()),
                _int64("step_index", state.step_index), _int64("lower_order_nums", state.lower_order_nums),
                _int64("steps", steps), _fp32("guidance", [self.guidance])]


@register_kind("hybrid-edge")
class EdgeModel(_HybridModel):
    """Continues a trajectory from the cloud's latents and scheduler state with the small UNet; decodes with the
    tiny VAE."""

    def load(self) -> bool:
        from distillery.papers.hybrid_sd.release import load_edge

        self._load_config()
        self.pipe = load_edge(self.model_dir)
        c = self.pipe.unet.config
        self.latent_shape = (int(c.in_channels), int(c.sample_size), int(c.sample_size))
        self.ready = True
        return True

    def _run(self, by_name: dict, params: dict) -> list:
        import torch

        from distillery.papers.hybrid_sd import sampler

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
        steps = _int(_tensor(by_name, "steps", "INT64", 1)[0].item(), "steps", 1, 200)
        step_index = _int(_tensor(by_name, "step_index", "INT64", 1)[0].item(), "step_index", 0, steps)
        lower = _int(_tensor(by_name, "lower_order_nums", "INT64", 1)[0].item(), "lower_order_nums", 0, 16)
        guidance = float(_tensor(by_name, "guidance", "FP32", 1)[0])
        if not math.isclose(guidance, self.guidance, rel_tol=1e-6):
            raise InvalidInput(f"'guidance' {guidance} differs from this release's {self.guidance}: the two halves of "
                               f"one trajectory must guide alike")
        state = sampler.SchedulerState(step_index, lower, torch.from_numpy(history) if len(history) else None)
        with self._lock, torch.inference_mode():
            try:
                final = sampler.run_rest(self.pipe, self.pipe.unet, prompts, torch.from_numpy(latents), state,
                                         steps=steps, guidance_scale=guidance)
            except ValueError as e:  # SchedulerState.check: the state does not fit this trajectory
                raise InvalidInput(str(e)) from None
            images = sampler.decode(self.pipe.vae, final)
        from PIL import Image

        pngs = []
        for img in images:
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            pngs.append(base64.b64encode(buf.getvalue()).decode())
        image = kserve.InferOutput(name="image", datatype="BYTES", shape=[len(pngs)], data=pngs,
                                   parameters={"content_type": "image/png;base64"})
        return [image, _fp32("latents", final.numpy())]


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
