"""Text-to-image predictor: a diffusers StableDiffusionPipeline folder behind KServe's V1 and V2 protocols.

V1  POST /v1/models/NAME:predict  {"instances": [{"prompt", "steps"?, "guidance"?, "seed"?, "negative_prompt"?}]}
    -> {"predictions": [{"image_png_b64", "seed", "steps"}]}
V2  POST /v2/models/NAME/infer    input "prompt" (BYTES, [n]); steps / guidance / seed / negative_prompt as
    parameters or as inputs (INT32 / FP32 / INT64 / BYTES, shape [1]); also over gRPC and with the binary tensor
    extension in both directions
    -> output "image" (BYTES, [n]): base64 PNGs in JSON (JSON carries no raw bytes), or the PNG bytes
       themselves after the JSON header with the binary data extension (binary_data_output), and over gRPC
Prompt k of a request is generated with seed + k. Concurrent requests with the same steps, guidance and negative
prompt are generated in one batched call; every image has its own generator, so it equals the unbatched one.
"""

from __future__ import annotations

import base64
import io
import json
import math
import threading
from pathlib import Path
from typing import Any

import kserve
import numpy as np
from kserve.errors import InvalidInput

from distillery.serving.batching import deadline_from
from distillery.serving.server import ServedModel, binary_output, register_kind, v2_array, v2_parameters

DEFAULTS = {"default_steps": 25, "max_steps": 100, "max_batch": 8, "default_guidance": 3.0, "max_guidance": 20.0,
            "max_prompt_chars": 500}


@register_kind("text-to-image")
class TextToImageModel(ServedModel):
    # Request fields besides "prompt" (V1 instance keys and V2 parameters), and the V2 inputs that carry them with
    # their datatypes; a subclass adds its own (`_v2_options` converts its extra inputs).
    OPTIONS: tuple[str, ...] = ("steps", "guidance", "seed", "negative_prompt")
    V2_INPUTS: dict[str, tuple[str, ...]] = {
        "steps": ("INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16"),
        "guidance": ("FP32", "FP64", "FP16"), "seed": ("INT64", "UINT64", "INT32", "UINT32"),
        "negative_prompt": ("BYTES",)}

    def __init__(self, name: str, model_dir: Path, **batching):
        super().__init__(name, model_dir, **batching)
        self.pipe = None
        self.limits = dict(DEFAULTS)
        self._lock = threading.Lock()  # a diffusers pipeline keeps scheduler state: one generation at a time

    def check(self) -> None:
        if not (self.model_dir / "model_index.json").exists():
            raise FileNotFoundError(f"{self.model_dir} is not a diffusers pipeline folder (no model_index.json)")
        cfg = self.model_dir / "distillery.json"
        if cfg.exists():
            given = json.loads(cfg.read_text())
            bad = {k: v for k, v in given.items()
                   if k in DEFAULTS and (isinstance(v, bool) or not isinstance(v, (int, float)))}
            if bad:
                raise ValueError(f"{cfg}: limits must be numbers, got {bad}")
            self.limits.update({k: v for k, v in given.items() if k in DEFAULTS})
            if not 1 <= self.limits["default_steps"] <= self.limits["max_steps"]:
                raise ValueError(f"{cfg}: default_steps must be between 1 and max_steps ({self.limits['max_steps']})")
        self.max_items = int(self.limits["max_batch"])

    def load_model(self) -> None:
        import torch
        from diffusers import StableDiffusionPipeline

        self.pipe = StableDiffusionPipeline.from_pretrained(self.model_dir, torch_dtype=torch.float32,
                                                            use_safetensors=True)
        # A GPU when the pod has one; seeds stay portable because generators live on the CPU.
        self.pipe.to("cuda" if torch.cuda.is_available() else "cpu")
        # oneDNN stays on: a batch of 8 costs 1.9-2.8x one image with it and 3.4-7.8x without (tiny-sd, 2 cores), and a
        # batched image still equals the unbatched one within a grey level on under 0.1% of pixels, as without it.
        self.pipe.set_progress_bar_config(disable=True)
        self.size = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor

    def get_input_types(self) -> list[dict]:
        return [{"name": "prompt", "datatype": "BYTES", "shape": [-1]},
                {"name": "steps", "datatype": "INT32", "shape": [1]},
                {"name": "guidance", "datatype": "FP32", "shape": [1]},
                {"name": "seed", "datatype": "INT64", "shape": [1]},
                {"name": "negative_prompt", "datatype": "BYTES", "shape": [1]}]

    def get_output_types(self) -> list[dict]:
        return [{"name": "image", "datatype": "BYTES", "shape": [-1]}]

    # ----------------------------------------------------------------------------------- validation

    def _number(self, value: Any, name: str, kind: type, lo: float, hi: float) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (kind is int and isinstance(value, float) and not value.is_integer()):
            raise InvalidInput(f"'{name}' must be {'an integer' if kind is int else 'a number'}, got {value!r}")
        if not lo <= value <= hi or (isinstance(value, float) and not math.isfinite(value)):
            raise InvalidInput(f"'{name}' must be between {lo} and {hi}, got {value!r}")
        return kind(value)

    def _request(self, prompts: list, options: dict) -> dict:
        if not prompts:
            raise InvalidInput("no prompt given: send at least one non-empty 'prompt'")
        if len(prompts) > self.limits["max_batch"]:
            raise InvalidInput(f"too many prompts: {len(prompts)} > {self.limits['max_batch']} per request")
        for p in prompts:
            if not isinstance(p, str) or not p.strip():
                raise InvalidInput(f"every 'prompt' must be a non-empty string, got {p!r}")
            if len(p) > self.limits["max_prompt_chars"]:
                raise InvalidInput(f"prompt longer than {self.limits['max_prompt_chars']} characters")
        unknown = set(options) - set(self.OPTIONS)
        if unknown:
            raise InvalidInput(f"unknown field(s) {sorted(unknown)}; allowed: prompt, {', '.join(self.OPTIONS)}")
        neg = options.get("negative_prompt", "")
        if not isinstance(neg, str):
            raise InvalidInput("'negative_prompt' must be a string")
        return {
            "prompts": prompts,
            "steps": self._number(options.get("steps", self.limits["default_steps"]), "steps", int, 1, self.limits["max_steps"]),
            "guidance": self._number(options.get("guidance", self.limits["default_guidance"]), "guidance", float, 1.0,
                                     self.limits["max_guidance"]),
            "seed": self._number(options.get("seed", 0), "seed", int, 0, 2**63 - 1 - len(prompts)),
            "negative_prompt": neg,
        }

    def run_batch(self, key: tuple, items: list[tuple[str, int]]) -> list[bytes]:
        """One pipeline call for prompts that share (steps, guidance, negative prompt), each with its own seed."""
        import torch

        steps, guidance, negative = key
        prompts = [p for p, _ in items]
        gens = [torch.Generator().manual_seed(seed) for _, seed in items]
        with self._lock, torch.inference_mode():
            images = self.pipe(prompts, num_inference_steps=steps, guidance_scale=guidance,
                               negative_prompt=[negative] * len(prompts) if negative else None,
                               height=self.size, width=self.size, generator=gens).images
        return [png_bytes(img) for img in images]

    def _batch(self, req: dict) -> tuple[tuple, list]:
        """The batching key (requests with equal keys share one pipeline call) and the request's items."""
        return (req["steps"], req["guidance"], req["negative_prompt"]), \
            [(p, req["seed"] + k) for k, p in enumerate(req["prompts"])]

    async def _generate(self, req: dict, headers: dict | None) -> tuple[list[bytes], dict]:
        """The request's PNGs and what a kind reports about how they were made (nothing here)."""
        key, items = self._batch(req)
        return await self.batcher.submit(key, items, deadline_from(headers)), {}

    # ------------------------------------------------------------------------------------ protocols

    async def predict(self, payload: Any, headers: dict | None = None, response_headers: dict | None = None):
        if isinstance(payload, kserve.InferRequest):
            return await self._predict_v2(payload, headers)
        if not isinstance(payload, dict) or not isinstance(payload.get("instances"), list):
            raise InvalidInput('V1 body must be {"instances": [{"prompt": "...", ...}]}')
        instances = payload["instances"]
        if not instances:
            raise InvalidInput("'instances' is empty: send at least one instance with a 'prompt'")
        if len(instances) > self.limits["max_batch"]:
            raise InvalidInput(f"too many prompts: {len(instances)} > {self.limits['max_batch']} per request")
        if not all(isinstance(i, dict) for i in instances):
            raise InvalidInput('each instance must be an object like {"prompt": "..."}')
        first = {k: v for k, v in instances[0].items() if k != "prompt"}
        if any({k: v for k, v in i.items() if k != "prompt"} != first for i in instances[1:]):
            raise InvalidInput("all instances of one request must share steps/guidance/seed; send separate requests")
        if any("prompt" not in i for i in instances):
            raise InvalidInput("missing 'prompt' in an instance")
        req = self._request([i["prompt"] for i in instances], first)
        pngs, info = await self._generate(req, headers)
        return {"predictions": [{"image_png_b64": base64.b64encode(p).decode(), "seed": req["seed"] + k,
                                 "steps": req["steps"], **info} for k, p in enumerate(pngs)]}

    async def _predict_v2(self, request: kserve.InferRequest, headers: dict | None) -> kserve.InferResponse:
        by_name = {i.name: i for i in request.inputs}
        unknown = set(by_name) - {"prompt", *self.V2_INPUTS}
        if unknown or "prompt" not in by_name:
            raise InvalidInput("V2 request needs an input named 'prompt' (datatype BYTES, shape [n]) and may have "
                               f"{', '.join(self.V2_INPUTS)}; got {sorted(by_name)}")
        prompt = v2_array(by_name["prompt"], ("BYTES",))
        if prompt.ndim != 1:
            raise InvalidInput(f"input 'prompt' must have shape [n], got {list(prompt.shape)}")
        prompts = [_text(d, "prompt") for d in prompt]
        requested = request.request_outputs or []
        if any(o.name != "image" for o in requested):
            raise InvalidInput(f"unknown output(s) {[o.name for o in requested if o.name != 'image']}; "
                               "this model has one output, 'image'")
        options = self._v2_options(by_name, v2_parameters(request))
        req = self._request(prompts, options)
        pngs, info = await self._generate(req, headers)
        binary = binary_output(request, "image")
        if request.from_grpc:  # KServe's to_grpc takes a list (a numpy array fails its truth test)
            data, content_type = list(pngs), "image/png"
        elif binary:  # raw PNG bytes, length-prefixed after the JSON header (KServe serializes them)
            data, content_type = np.array(pngs, dtype=np.object_), "image/png"
        else:
            data, content_type = [base64.b64encode(p).decode() for p in pngs], "image/png;base64"
        out = kserve.InferOutput(name="image", datatype="BYTES", shape=[len(pngs)], data=data,
                                 parameters={"content_type": content_type})
        # V2 parameters are scalars (gRPC's InferParameter): structured reports travel as JSON text.
        info = {k: v if isinstance(v, (str, int, float, bool)) else json.dumps(v) for k, v in info.items()}
        return kserve.InferResponse(model_name=self.name, infer_outputs=[out], response_id=request.id or "",
                                    parameters={"steps": req["steps"], "seed": req["seed"], **info},
                                    use_binary_outputs=binary, requested_outputs=request.request_outputs)

    def _v2_options(self, by_name: dict, options: dict) -> dict:
        """Request options from V2 parameters and scalar inputs (an input wins over a parameter of its name)."""
        for name in TextToImageModel.V2_INPUTS:
            if name in by_name:
                values = v2_array(by_name[name], self.V2_INPUTS[name]).reshape(-1)
                if len(values) != 1:
                    raise InvalidInput(f"input '{name}' must hold exactly one value")
                options[name] = _text(values[0], name) if name == "negative_prompt" else values[0].item()
        return options


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _text(value: Any, name: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            raise InvalidInput(f"'{name}' must be UTF-8 text") from None
    return value
