"""Text-to-image predictor: a diffusers StableDiffusionPipeline folder behind KServe's V1 and V2 protocols.

V1  POST /v1/models/NAME:predict  {"instances": [{"prompt", "steps"?, "guidance"?, "seed"?, "negative_prompt"?}]}
    -> {"predictions": [{"image_png_b64", "seed", "steps"}]}
V2  POST /v2/models/NAME/infer    input "prompt" (BYTES, [n]); steps / guidance / seed as parameters or inputs
    -> output "image" (BYTES, [n]): base64 PNGs in JSON (JSON carries no raw bytes), or the PNG bytes
       themselves after the JSON header with the binary data extension (parameters.binary_data_output = true)
"""

from __future__ import annotations

import asyncio
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

from distillery.serving.server import register_kind

DEFAULTS = {"default_steps": 25, "max_steps": 100, "max_batch": 8, "default_guidance": 3.0, "max_guidance": 20.0,
            "max_prompt_chars": 500}


@register_kind("text-to-image")
class TextToImageModel(kserve.Model):
    def __init__(self, name: str, model_dir: Path):
        super().__init__(name)
        self.model_dir = Path(model_dir)
        self.pipe = None
        self.limits = dict(DEFAULTS)
        self._lock = threading.Lock()  # a diffusers pipeline keeps scheduler state: one generation at a time

    def load(self) -> bool:
        import torch
        from diffusers import StableDiffusionPipeline

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
        self.pipe = StableDiffusionPipeline.from_pretrained(self.model_dir, torch_dtype=torch.float32,
                                                            use_safetensors=True)
        # A GPU when the pod has one; seeds stay portable because generators live on the CPU.
        self.pipe.to("cuda" if torch.cuda.is_available() else "cpu")
        self.pipe.set_progress_bar_config(disable=True)
        self.size = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        self.ready = True
        return True

    # ----------------------------------------------------------------------------------- validation

    def _number(self, value: Any, name: str, kind: type, lo: float, hi: float) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
            raise InvalidInput(f"'{name}' must be {'an integer' if kind is int else 'a number'}, got {value!r}")
        if not math.isfinite(float(value)) or not lo <= value <= hi:
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
        unknown = set(options) - {"steps", "guidance", "seed", "negative_prompt"}
        if unknown:
            raise InvalidInput(f"unknown field(s) {sorted(unknown)}; allowed: prompt, steps, guidance, seed, negative_prompt")
        neg = options.get("negative_prompt", "")
        if not isinstance(neg, str):
            raise InvalidInput("'negative_prompt' must be a string")
        return {
            "prompts": prompts,
            "steps": self._number(options.get("steps", self.limits["default_steps"]), "steps", int, 1, self.limits["max_steps"]),
            "guidance": self._number(options.get("guidance", self.limits["default_guidance"]), "guidance", float, 1.0,
                                     self.limits["max_guidance"]),
            "seed": self._number(options.get("seed", 0), "seed", int, 0, 2**63 - 1),
            "negative_prompt": neg,
        }

    def _generate(self, req: dict) -> list[bytes]:
        import torch

        n = len(req["prompts"])
        gens = [torch.Generator().manual_seed(req["seed"] + i) for i in range(n)]
        with self._lock, torch.inference_mode():
            images = self.pipe(req["prompts"], num_inference_steps=req["steps"], guidance_scale=req["guidance"],
                               negative_prompt=[req["negative_prompt"]] * n if req["negative_prompt"] else None,
                               height=self.size, width=self.size, generator=gens).images
        out = []
        for img in images:
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            out.append(buf.getvalue())
        return out

    # ------------------------------------------------------------------------------------ protocols

    async def predict(self, payload: Any, headers: dict | None = None, response_headers: dict | None = None):
        if isinstance(payload, kserve.InferRequest):
            return await self._predict_v2(payload)
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
        pngs = await asyncio.get_running_loop().run_in_executor(None, self._generate, req)
        return {"predictions": [{"image_png_b64": base64.b64encode(p).decode(), "seed": req["seed"] + k,
                                 "steps": req["steps"]} for k, p in enumerate(pngs)]}

    async def _predict_v2(self, request: kserve.InferRequest) -> kserve.InferResponse:
        by_name = {i.name: i for i in request.inputs}
        if "prompt" not in by_name:
            raise InvalidInput("V2 request needs an input named 'prompt' (datatype BYTES)")
        prompt = by_name["prompt"]
        if prompt.datatype != "BYTES":
            raise InvalidInput(f"input 'prompt' must have datatype BYTES, got {prompt.datatype}")
        data = prompt.data if isinstance(prompt.data, list) else []
        if len(prompt.shape) != 1 or prompt.shape[0] != len(data):
            raise InvalidInput(f"input 'prompt' shape {prompt.shape} does not match its {len(data)} values")
        prompts = [d.decode() if isinstance(d, bytes) else d for d in data]
        requested = request.request_outputs or []
        if any(o.name != "image" for o in requested):
            raise InvalidInput(f"unknown output(s) {[o.name for o in requested if o.name != 'image']}; "
                               "this model has one output, 'image'")
        # KServe's own switch for the binary data extension; everything else is a generation option.
        options = {k: v for k, v in (request.parameters or {}).items() if k != "binary_data_output"}
        binary = bool(requested[0].binary_data) if requested else request.use_binary_outputs
        for name in ("steps", "guidance", "seed"):
            if name in by_name:
                values = by_name[name].data
                if not isinstance(values, list) or len(values) != 1:
                    raise InvalidInput(f"input '{name}' must hold exactly one value")
                options[name] = values[0]
        req = self._request(prompts, options)
        pngs = await asyncio.get_running_loop().run_in_executor(None, self._generate, req)
        if binary:  # raw PNG bytes, length-prefixed after the JSON header (KServe serializes them)
            data, content_type = np.array(pngs, dtype=np.object_), "image/png"
        else:
            data, content_type = [base64.b64encode(p).decode() for p in pngs], "image/png;base64"
        out = kserve.InferOutput(name="image", datatype="BYTES", shape=[len(pngs)], data=data,
                                 parameters={"content_type": content_type})
        return kserve.InferResponse(model_name=self.name, infer_outputs=[out], response_id=request.id or "",
                                    parameters={"steps": req["steps"], "seed": req["seed"]},
                                    use_binary_outputs=binary, requested_outputs=request.request_outputs)
