"""Image quality without Inception or CLIP weights: a feature network trained on the real data.

Frechet distance is computed in that network's penultimate feature space (the FID recipe with a
domain feature extractor) and conditional accuracy asks the same network whether a generated image
shows the class its prompt named. A user who has Inception weights passes them as `inception_path`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import linalg

from distillery.models.tiny_sd import to_tensor


class FeatureNet(nn.Module):
    def __init__(self, num_classes: int, width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.config = {"num_classes": num_classes, "width": width, "feature_dim": feature_dim}
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Linear(4 * w, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    @torch.no_grad()
    def features(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        self.eval()
        return np.concatenate([self.body(to_tensor(images[i:i + batch_size])).numpy()
                               for i in range(0, len(images), batch_size)])

    @torch.no_grad()
    def predict(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        self.eval()
        return np.concatenate([self(to_tensor(images[i:i + batch_size])).argmax(1).numpy()
                               for i in range(0, len(images), batch_size)])

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file(self.state_dict(), path / "feature_net.safetensors")
        (path / "config.json").write_text(json.dumps(self.config))

    @classmethod
    def load(cls, path: Path) -> "FeatureNet":
        from safetensors.torch import load_file

        path = Path(path)
        net = cls(**json.loads((path / "config.json").read_text()))
        net.load_state_dict(load_file(path / "feature_net.safetensors"))
        return net.eval()


def train_feature_net(images: np.ndarray, labels: np.ndarray, num_classes: int, *, steps: int = 500,
                      batch_size: int = 64, lr: float = 2e-3, seed: int = 0) -> FeatureNet:
    """A classifier on the real training images (with small shifts as augmentation)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = FeatureNet(num_classes)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    x_all, y_all = to_tensor(images), torch.from_numpy(np.asarray(labels)).long()
    net.train()
    for _ in range(steps):
        idx = torch.randint(len(x_all), (batch_size,), generator=gen)
        dx, dy = torch.randint(-2, 3, (2,), generator=gen).tolist()
        x = torch.roll(x_all[idx], shifts=(dx, dy), dims=(2, 3))
        loss = F.cross_entropy(net(x), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


def frechet_distance(a: np.ndarray, b: np.ndarray, eps: float = 1e-6) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2), regularized so small samples stay finite."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"Frechet distance needs at least 2 samples per set, got {len(a)} and {len(b)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    offset = np.eye(len(mu_a)) * eps
    covmean, _ = linalg.sqrtm((s_a + offset) @ (s_b + offset), disp=False)
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))


def make_grid(images, nrow: int = 8, pad: int = 2):
    """uint8 HxWx3 images -> one PIL grid."""
    from PIL import Image

    images = [np.asarray(i) for i in images]
    h, w = images[0].shape[:2]
    rows = (len(images) + nrow - 1) // nrow
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, np.uint8)
    for k, img in enumerate(images):
        r, c = divmod(k, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = img[..., :3]
    scale = max(1, 256 // max(h, 1))
    return Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.Resampling.NEAREST)


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], *, steps: int, guidance_scale: float,
             resolution: int | None = None) -> np.ndarray:
    size = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance_scale, height=size, width=size,
               generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np").images
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def evaluate_text_to_image(pipe, holdout, feature_net: FeatureNet, *, num_per_class: int, steps: int,
                           guidance_scale: float, seed: int = 0, inception_path: Path | None = None) -> dict:
    """Generate `num_per_class` images per class prompt with fixed seeds; compare with the held-out real images."""
    if inception_path is not None and not Path(inception_path).exists():
        raise FileNotFoundError(f"Inception weights not found at {inception_path}")
    generated, wanted, seconds = [], [], 0.0
    for c, prompt in enumerate(holdout.class_prompts):
        seeds = [seed * 100_003 + c * num_per_class + i for i in range(num_per_class)]
        t = time.perf_counter()
        generated.append(generate(pipe, [prompt] * num_per_class, seeds, steps=steps, guidance_scale=guidance_scale))
        seconds += time.perf_counter() - t
        wanted += [c] * num_per_class
    images = np.concatenate(generated)
    wanted = np.array(wanted)
    fd = frechet_distance(feature_net.features(images), feature_net.features(holdout.images))
    acc = float((feature_net.predict(images) == wanted).mean())
    shown = [images[c * num_per_class + i] for c in range(len(holdout.class_prompts)) for i in range(min(8, num_per_class))]
    return {"fd": fd, "cond_acc": acc, "latency_s": seconds / len(images),
            "unet_evals_per_image": float(steps * (2 if guidance_scale > 1 else 1)),
            "num_generated": float(len(images)), "grid": make_grid(shown, nrow=min(8, num_per_class))}
