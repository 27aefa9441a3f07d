"""The add-ons: what a ControlNet is conditioned on, what the LoRAs learn, and how a LoRA file is read.

A ControlNet here follows outlines: its condition is a deterministic edge map of the image (Sobel gradient magnitude
of the grey image, thresholded at a fixed fraction of its maximum; white edges on black, like the Canny maps
ControlNets are usually trained on). Each LoRA learns one style, a fixed transformation of the training images, so a
test can see which style an output took. LoRA files are what diffusers' `save_lora_weights` writes from a peft
adapter (`pytorch_lora_weights.safetensors`, keys `unet.<module>.lora_A.weight` / `.lora_B.weight`, alpha in the
metadata), so `load_lora_weights` reads them unchanged (the baseline runtime does); `read_lora` turns one into
per-module (A, B) pairs for patching W += scale * (alpha / r) * B A.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

LORA_FILE = "pytorch_lora_weights.safetensors"
EDGE_THRESHOLD = 0.25  # fraction of the image's largest gradient that counts as an edge


def edge_map(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) -> uint8 (N, H, W, 3): 255 where the Sobel gradient magnitude of the grey image is at
    least EDGE_THRESHOLD of that image's largest, else 0. A flat image has no edges."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    grey = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    p = np.pad(grey, ((0, 0), (1, 1), (1, 1)), mode="edge")
    # Sobel as shifted sums: gx = [1 0 -1; 2 0 -2; 1 0 -1] correlation, gy its transpose.
    def s(dy, dx):
        return p[:, 1 + dy:p.shape[1] - 1 + dy, 1 + dx:p.shape[2] - 1 + dx]
    gx = (s(-1, 1) + 2 * s(0, 1) + s(1, 1)) - (s(-1, -1) + 2 * s(0, -1) + s(1, -1))
    gy = (s(1, -1) + 2 * s(1, 0) + s(1, 1)) - (s(-1, -1) + 2 * s(-1, 0) + s(-1, 1))
    mag = np.hypot(gx, gy)
    peak = mag.reshape(len(mag), -1).max(axis=1).reshape(-1, 1, 1)
    edges = (mag >= EDGE_THRESHOLD * np.maximum(peak, 1e-6)) & (peak > 0)
    return np.repeat((edges * 255).astype(np.uint8)[..., None], 3, axis=-1)


def _inverted(images: np.ndarray) -> np.ndarray:
    return 255 - images


def _thick(images: np.ndarray) -> np.ndarray:
    """Bright strokes grown by two pixels (a 5x5 grey dilation per channel)."""
    p = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="edge")
    h, w = images.shape[1:3]
    return np.max([p[:, dy:dy + h, dx:dx + w] for dy in range(5) for dx in range(5)], axis=0)


def _tint(images: np.ndarray) -> np.ndarray:
    """The grey image in orange-red: the red channel carries the brightness, green and blue little of it."""
    grey = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.clip(grey[..., None] * np.array([1.0, 0.45, 0.1], np.float32), 0, 255).round().astype(np.uint8)


STYLES = {"inverted": _inverted, "thick": _thick, "tint": _tint}


def stylize(images: np.ndarray, style: str) -> np.ndarray:
    if style not in STYLES:
        raise ValueError(f"unknown LoRA style {style!r}; available: {sorted(STYLES)}")
    return STYLES[style](images)


@dataclass
class LoRA:
    """One LoRA in memory: per UNet module, A (r, in, *k) and B (out, r, 1...) and the file's alpha / r scaling.
    `state_dict` is the file's own tensors (the baseline hands them to diffusers' `load_lora_weights`)."""

    name: str
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scaling: float
    state_dict: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_dict.values())

    def factors(self, module: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """B (out, r) and A (r, in * k * k) as matrices in `dtype`: B A is the layer's weight flattened per output."""
        a, b = self.layers[module]
        return b.reshape(b.shape[0], -1).to(dtype), a.reshape(a.shape[0], -1).to(dtype)

    def delta(self, module: str, weight_shape: torch.Size) -> torch.Tensor:
        """(alpha / r) * B A in the layer's weight shape: Linear (out, in), Conv2d (out, in, k, k)."""
        b, a = self.factors(module, torch.float32)
        return (self.scaling * (b @ a)).reshape(weight_shape)


def read_lora(path: Path, name: str = "") -> LoRA:
    """A LoRA file written by `save_lora_weights` (UNet layers only; peft's lora_A / lora_B key names or diffusers'
    older lora.down / lora.up), read with safetensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        sd = {k: f.get_tensor(k) for k in f.keys()}
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        for part, tag in ((".lora.down.weight", "A"), (".lora.up.weight", "B"), (".lora_A.weight", "A"),
                          (".lora_B.weight", "B")):
            if key.endswith(part):
                module = key[:-len(part)]
                if not module.startswith("unet."):
                    raise ValueError(f"{path}: only UNet LoRAs are served, found key {key!r}")
                layers.setdefault(module[len("unet."):], {})[tag] = t
                break
        else:
            raise ValueError(f"{path}: unexpected key {key!r} (expected LoRA keys unet.<module>.lora_A.weight / "
                             f".lora_B.weight)")
    incomplete = [m for m, ab in layers.items() if set(ab) != {"A", "B"}]
    if incomplete or not layers:
        raise ValueError(f"{path}: every layer needs both lora.down and lora.up weights; missing for {incomplete}"
                         if incomplete else f"{path}: holds no LoRA layers")
    rank = next(iter(layers.values()))["A"].shape[0]
    config = json.loads(meta.get("lora_adapter_metadata", "{}")).get("unet.lora_alpha")
    alpha = float(config) if config is not None else float(rank)  # diffusers' default when no alpha is stored
    return LoRA(name, {m: (ab["A"], ab["B"]) for m, ab in layers.items()}, alpha / rank, sd)
