"""SwiftDiffusion predictor: the text-to-image predictor plus LoRA and ControlNet add-ons fetched by name, served by
`distillery.papers.swift_diffusion.runtime` (add-on cache, LoRAs patched in at a step boundary, ControlNet
concurrent with the UNet). Kind "swift-diffusion"; "swift-diffusion-baseline" serves the same folder the plain
diffusers way (load_lora_weights + fuse_lora per request, ControlNet before the UNet), for comparison.

V1  {"instances": [{"prompt", ...the text-to-image fields..., "loras"?: [{"name", "scale"?}],
                    "controlnet"?: {"name", "image": base64 PNG, "scale"?}}]}
    -> each prediction also carries "addons": what happened (per LoRA: cache hit/miss and the first step it ran in;
       the ControlNet's cache hit/miss)
V2  the text-to-image inputs plus "lora_name" (BYTES [m]), "lora_scale" (FP32 [m]), "controlnet" (BYTES [1]),
    "control_image" (BYTES [1]: PNG bytes with the binary extension, base64 text in JSON), "controlnet_scale"
    (FP32 [1]) -> the response parameter "addons" holds the same report as JSON text.

The model folder is a diffusers pipeline; `distillery.json` may set `addons_uri` (a folder or s3:// prefix holding
`lora/NAME/pytorch_lora_weights.safetensors` and `controlnet/NAME/` ControlNetModel folders; default `addons/`
inside the model folder), `addon_cache_bytes`, `wait_fraction` (K / N), `max_loras`, `max_addon_scale`,
`parallel_controlnet`, `controlnet_process` (the concurrent ControlNet in a worker process of its own, on CPU; on by
default), `controlnet_threads`, `controlnet_cond_only` (under guidance the ControlNet steers the conditional half only,
as in the paper: half its work; on by default), `guidance_split` (guidance's two halves on two threads, the ControlNet on
the conditional half only; off by default), `compile_backbone` (the UNet and ControlNets compiled with
`torch.compile`, the ControlNet run right before the UNet; off by default: the load then compiles and warms up for
15-60 s on 2 cores, and each new batch shape compiles once), `fetch_timeout_s`. Unknown add-on names, unreadable or wrongly
sized control images and scales out of range are answered 400 before any work starts; an add-on store that fails
or hangs mid-request is a 503 for that request only.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from kserve.errors import InvalidInput
from prometheus_client import Counter, Histogram

from distillery.serving.batching import RequestFailed
from distillery.serving.server import register_kind, v2_array
from distillery.serving.text_to_image import TextToImageModel, _text, png_bytes

ADDON_DEFAULTS = {"addons_uri": "addons", "addon_cache_bytes": 512 << 20, "wait_fraction": 0.4, "max_loras": 3,
                  "max_addon_scale": 2.0, "parallel_controlnet": True, "controlnet_process": True,
                  "controlnet_threads": 1, "controlnet_cond_only": True, "guidance_split": False,
                  "compile_backbone": False, "fetch_timeout_s": 120.0}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
PNG = b"\x89PNG\r\n\x1a\n"
INDEX_REFRESH_S = 2.0  # an unknown name re-lists the store at most this often (a listing per bad request is a DoS)

CACHE = Counter("swift_addon_cache", "Add-on cache lookups by kind and result", ["kind", "result"])
APPLIED = Histogram("swift_lora_applied_from_step", "First denoising step a LoRA ran in",
                    buckets=(0, 1, 2, 4, 8, 16, 32, 64))


class AddonUnavailable(RequestFailed):
    """The add-on store failed for this request (503); the predictor stays ready."""


@register_kind("swift-diffusion")
class SwiftDiffusionModel(TextToImageModel):
    OPTIONS = TextToImageModel.OPTIONS + ("loras", "controlnet")
    V2_INPUTS = {**TextToImageModel.V2_INPUTS, "lora_name": ("BYTES",), "lora_scale": ("FP32", "FP64"),
                 "controlnet": ("BYTES",), "control_image": ("BYTES",), "controlnet_scale": ("FP32", "FP64")}
    baseline = False

    def __init__(self, name: str, model_dir: Path, **batching):
        super().__init__(name, model_dir, **batching)
        self.addon_limits = dict(ADDON_DEFAULTS)
        self.runtime = None
        self._index: set[tuple[str, str]] = set()
        self._indexed_at = float("-inf")
        self._index_lock = threading.Lock()

    def check(self) -> None:
        super().check()
        cfg = self.model_dir / "distillery.json"
        given = json.loads(cfg.read_text()) if cfg.exists() else {}
        for k, default in ADDON_DEFAULTS.items():
            if k in given:
                v = given[k]
                if type(v) is not type(default) and not (isinstance(default, float) and type(v) is int):
                    raise ValueError(f"{cfg}: {k} must be a {type(default).__name__}, got {v!r}")
                self.addon_limits[k] = v
        if not self.addon_limits["fetch_timeout_s"] > 0:
            raise ValueError(f"{cfg}: fetch_timeout_s must be > 0, got {self.addon_limits['fetch_timeout_s']}")
        if not 0 <= self.addon_limits["wait_fraction"] < 1:
            raise ValueError(f"{cfg}: wait_fraction must be in [0, 1), got {self.addon_limits['wait_fraction']}")
        for k in ("addon_cache_bytes", "max_loras", "controlnet_threads"):
            if self.addon_limits[k] < 1:
                raise ValueError(f"{cfg}: {k} must be >= 1, got {self.addon_limits[k]}")
        if self.addon_limits["compile_backbone"] and self.addon_limits["guidance_split"] and not self.baseline:
            raise ValueError(f"{cfg}: compile_backbone and guidance_split exclude each other (the compiled UNet runs "
                             f"both halves in one call); set one of them to false")
        uri = self.addon_limits["addons_uri"]
        self.addons_uri = uri if "://" in uri or uri.startswith("/") else str(self.model_dir / uri)

    def load_model(self) -> None:
        from distillery.papers.swift_diffusion.runtime import AddonCache, SwiftRuntime

        super().load_model()
        lim = self.addon_limits
        cache = AddonCache(self._load_addon, lim["addon_cache_bytes"])
        self.runtime = SwiftRuntime(self.pipe, cache, wait_fraction=lim["wait_fraction"],
                                    parallel_controlnet=lim["parallel_controlnet"],
                                    controlnet_process=lim["controlnet_process"],
                                    controlnet_threads=lim["controlnet_threads"],
                                    controlnet_cond_only=lim["controlnet_cond_only"],
                                    guidance_split=lim["guidance_split"], baseline=self.baseline,
                                    compile_backbone=lim["compile_backbone"] and not self.baseline,
                                    fetch_timeout_s=lim["fetch_timeout_s"])
        self._refresh_index()
        self.warmup_s = self._warm_up() if self.runtime.compiled else 0.0

    def _warm_up(self) -> float:
        """Compiles at load what a request at the default guidance uses (the UNet, and the store's first ControlNet,
        which lands in the cache): seconds taken. Other batch shapes compile at their first request."""
        import torch

        from distillery.papers.swift_diffusion.runtime import Generation

        t = time.perf_counter()
        g = Generation(prompts=["warm-up"], seeds=[0], steps=2, guidance=float(self.limits["default_guidance"]))
        controlnets = self.addon_names("controlnet")
        with torch.inference_mode():
            self.runtime.generate(g)
            if controlnets:
                self.runtime.generate(replace(g, controlnet=controlnets[0],
                                              control_image=torch.zeros(1, 3, self.size, self.size)))
        return time.perf_counter() - t

    # ----------------------------------------------------------------------------------- add-on store

    def _refresh_index(self) -> None:
        """The add-on names the store holds: lora/NAME/... and controlnet/NAME/... under addons_uri."""
        from distillery.platform import storage

        root = self.addons_uri.rstrip("/")
        found = set()
        for path in storage.list_uri(root):
            parts = str(path)[len(root):].lstrip("/").split("/")
            if len(parts) >= 3 and parts[0] in ("lora", "controlnet") and NAME.match(parts[1]):
                found.add((parts[0], parts[1]))
        with self._index_lock:
            self._index, self._indexed_at = found, time.monotonic()

    def addon_names(self, kind: str) -> list[str]:
        """The names of the store's add-ons of this kind ("lora" or "controlnet"), sorted, as last listed."""
        return sorted(n for k, n in self._index if k == kind)

    def _known(self, kind: str, name: Any) -> str:
        if not isinstance(name, str) or not NAME.match(name):
            raise InvalidInput(f"{kind} name must be a string of letters, digits, '.', '_' or '-', got {name!r}")
        if (kind, name) not in self._index:
            if time.monotonic() - self._indexed_at > INDEX_REFRESH_S:  # added to the store since the last look?
                self._refresh_index()
            if (kind, name) not in self._index:
                known = self.addon_names(kind)
                raise InvalidInput(f"unknown {kind} {name!r}; available: {known}")
        return name

    def _load_addon(self, kind: str, name: str):
        """Runs on the cache's fetch threads: download from the store, then read with safetensors."""
        from diffusers import ControlNetModel

        from distillery.papers.swift_diffusion.addons import LORA_FILE, read_lora
        from distillery.platform import storage

        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = storage.download(f"{self.addons_uri.rstrip('/')}/{kind}/{name}", Path(tmp) / name)
            except Exception as e:  # noqa: BLE001 - any store failure is this request's 503
                raise AddonUnavailable(f"{kind} {name!r} could not be fetched: {type(e).__name__}: {e}") from None
            try:
                if kind == "lora":
                    lora = read_lora(local / LORA_FILE, name)
                    self.runtime.patcher.check(lora)
                    return lora
                return ControlNetModel.from_pretrained(local, use_safetensors=True).eval()
            except (ValueError, OSError, KeyError) as e:
                raise InvalidInput(f"{kind} {name!r} does not fit this model: {e}") from None

    # ----------------------------------------------------------------------------------- validation

    def _scale(self, value: Any, name: str) -> float:
        return self._number(value, name, float, 0.0, self.addon_limits["max_addon_scale"])

    def _control_image(self, value: Any):
        import torch
        from PIL import Image

        if isinstance(value, str):
            try:
                value = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidInput("controlnet 'image' must be a base64-encoded PNG") from None
        if not isinstance(value, bytes):
            raise InvalidInput(f"controlnet 'image' must be a base64-encoded PNG, got {type(value).__name__}")
        try:
            img = Image.open(io.BytesIO(value))  # reads the header only
        except Exception as e:  # noqa: BLE001 - PIL's many ways to refuse a file
            raise InvalidInput(f"controlnet 'image' is not a readable image: {e}") from None
        if img.size != (self.size, self.size):  # before decoding: a small PNG can declare a huge canvas
            raise InvalidInput(f"controlnet 'image' must be {self.size}x{self.size} pixels, got {img.size[0]}x"
                               f"{img.size[1]}")
        try:
            img.load()
        except Exception as e:  # noqa: BLE001
            raise InvalidInput(f"controlnet 'image' is not a readable image: {e}") from None
        arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0  # [0, 1], as diffusers feeds a ControlNet
        return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()

    def _request(self, prompts: list, options: dict) -> dict:
        options = dict(options)
        loras, controlnet = options.pop("loras", []), options.pop("controlnet", None)
        req = super()._request(prompts, options)
        if not isinstance(loras, list) or len(loras) > self.addon_limits["max_loras"]:
            raise InvalidInput(f"'loras' must be a list of at most {self.addon_limits['max_loras']} "
                               f'{{"name", "scale"}} objects')
        chosen = []
        for entry in loras:
            if not isinstance(entry, dict) or "name" not in entry or set(entry) - {"name", "scale"}:
                raise InvalidInput(f'each LoRA must be {{"name": ..., "scale": ...}}, got {entry!r}')
            chosen.append((self._known("lora", entry["name"]), self._scale(entry.get("scale", 1.0), "lora scale")))
        if len({n for n, _ in chosen}) != len(chosen):
            raise InvalidInput("the same LoRA is named twice; give it once with the summed scale")
        req["loras"], req["controlnet"], req["control_image"], req["controlnet_scale"] = tuple(chosen), None, None, 1.0
        if controlnet is not None:
            if not isinstance(controlnet, dict) or not {"name", "image"} <= set(controlnet) \
                    or set(controlnet) - {"name", "image", "scale"}:
                raise InvalidInput('\'controlnet\' must be {"name": ..., "image": base64 PNG, "scale"?: ...}')
            req["controlnet"] = self._known("controlnet", controlnet["name"])
            req["controlnet_scale"] = self._scale(controlnet.get("scale", 1.0), "controlnet scale")
            req["control_image"] = self._control_image(controlnet["image"])
        return req

    def _v2_options(self, by_name: dict, options: dict) -> dict:
        options = super()._v2_options(by_name, options)
        if "lora_name" in by_name:
            names = [_text(n, "lora_name") for n in v2_array(by_name["lora_name"], ("BYTES",)).reshape(-1)]
            scales = [1.0] * len(names)
            if "lora_scale" in by_name:
                scales = [float(s) for s in v2_array(by_name["lora_scale"], ("FP32", "FP64")).reshape(-1)]
                if len(scales) != len(names):
                    raise InvalidInput(f"'lora_scale' must hold one value per 'lora_name' ({len(names)}), "
                                       f"got {len(scales)}")
            options["loras"] = [{"name": n, "scale": s} for n, s in zip(names, scales)]
        elif "lora_scale" in by_name:
            raise InvalidInput("'lora_scale' given without 'lora_name'")
        given = {k for k in ("controlnet", "control_image", "controlnet_scale") if k in by_name}
        if given and not {"controlnet", "control_image"} <= given:
            raise InvalidInput("a ControlNet needs both inputs 'controlnet' (its name) and 'control_image'")
        if given:
            one = {k: v2_array(by_name[k], self.V2_INPUTS[k]).reshape(-1) for k in given}
            if any(len(v) != 1 for v in one.values()):
                raise InvalidInput("'controlnet', 'control_image' and 'controlnet_scale' hold one value each")
            image = one["control_image"][0]
            if isinstance(image, bytes) and not image.startswith(PNG):
                image = _text(image, "control_image")  # base64 text sent as BYTES
            options["controlnet"] = {"name": _text(one["controlnet"][0], "controlnet"), "image": image}
            if "controlnet_scale" in one:
                options["controlnet"]["scale"] = float(one["controlnet_scale"][0])
        return options

    def get_input_types(self) -> list[dict]:
        return super().get_input_types() + [
            {"name": "lora_name", "datatype": "BYTES", "shape": [-1]},
            {"name": "lora_scale", "datatype": "FP32", "shape": [-1]},
            {"name": "controlnet", "datatype": "BYTES", "shape": [1]},
            {"name": "control_image", "datatype": "BYTES", "shape": [1]},
            {"name": "controlnet_scale", "datatype": "FP32", "shape": [1]}]

    # ----------------------------------------------------------------------------------- generation

    def _batch(self, req: dict) -> tuple[tuple, list]:
        key, items = super()._batch(req)
        return key + (req["loras"], req["controlnet"], req["controlnet_scale"]), \
            [(p, seed, req["control_image"]) for p, seed in items]

    async def _generate(self, req: dict, headers: dict | None) -> tuple[list[bytes], dict]:
        from distillery.serving.batching import deadline_from

        key, items = self._batch(req)
        results = await self.batcher.submit(key, items, deadline_from(headers))
        return [png for png, _ in results], {"addons": results[0][1]}

    def run_batch(self, key: tuple, items: list) -> list[tuple[bytes, dict]]:
        import torch

        from distillery.papers.swift_diffusion.runtime import Generation

        steps, guidance, negative, loras, controlnet, controlnet_scale = key
        g = Generation(prompts=[p for p, _, _ in items], seeds=[s for _, s, _ in items], steps=steps,
                       guidance=guidance, negative_prompt=negative, loras=list(loras), controlnet=controlnet,
                       control_image=torch.cat([c for _, _, c in items]) if controlnet else None,
                       controlnet_scale=controlnet_scale)
        with self._lock, torch.inference_mode():  # the runtime sets this thread's intra-op budget per call
            try:
                images, report = self.runtime.generate(g)
            except TimeoutError as e:  # the store hangs: this request fails, the model is fine
                raise AddonUnavailable(str(e)) from None
        for entry in report["loras"]:
            CACHE.labels("lora", entry["cache"]).inc()
            APPLIED.observe(entry["applied_from_step"])
        if "controlnet" in report:
            CACHE.labels("controlnet", report["controlnet"]["cache"]).inc()
        return [(png_bytes(img), report) for img in images]


@register_kind("swift-diffusion-baseline")
class BaselineDiffusionModel(SwiftDiffusionModel):
    """The same requests served the plain diffusers way (the benchmark's baseline)."""

    baseline = True
