"""Quality of late LoRA patching: SSIM of an image whose LoRA landed at step K against the image with the LoRA from
step 0 (the paper's SSIM against reference images), and the runtime wrapper that makes a LoRA land at exactly K."""

from __future__ import annotations

from concurrent.futures import Future

import numpy as np
import torch
import torch.nn.functional as F


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Structural similarity per image pair (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03,
    the mean over pixels and channels). a, b: float (N, H, W, C) in [0, data_range]."""
    if a.shape != b.shape or a.ndim != 4 or min(a.shape[1:3]) < 6:
        raise ValueError(f"need two (N, H, W, C) batches of one shape, at least 6x6, got {a.shape} and {b.shape}")
    x, y = (torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64)).permute(0, 3, 1, 2) for v in (a, b))
    c = x.shape[1]
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5 ** 2))
    g = (g / g.sum()).outer(g / g.sum()).expand(c, 1, 11, 11)

    def blur(v):  # reflected borders: every pixel of a small image counts, as in scikit-image's default
        return F.conv2d(F.pad(v, (5, 5, 5, 5), mode="reflect"), g, groups=c)

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3)).numpy()


class LandsAt:
    """An add-on cache stand-in whose LoRAs land while step `step` - 1 runs (0: before the first step), for a
    runtime whose wait step is `step` too: the LoRA then runs from exactly that step, the late-patching quality
    measured without timing noise. ControlNets come from `cache`."""

    def __init__(self, cache, unet, step: int):
        self.cache, self.step, self._futures = cache, step, []
        self._calls = 0
        self._hook = unet.register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        self._calls += 1
        if self._calls == self.step:  # step K-1 is running: the load completes before the boundary to step K
            for f, addon in self._futures:
                if not f.done():
                    f.set_result(addon)

    def fetch(self, kind: str, name: str) -> tuple[Future, bool]:
        addon, _ = self.cache.get(kind, name)
        f: Future = Future()
        if self.step == 0:
            f.set_result(addon)
        self._futures.append((f, addon))
        return f, False

    def get(self, kind: str, name: str):
        return self.cache.get(kind, name)

    def close(self) -> None:
        self._hook.remove()
