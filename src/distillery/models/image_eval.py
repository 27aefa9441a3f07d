"""Image quality without Inception or CLIP weights: a feature network trained on the real data.

Frechet distance (FD) and kernel distance (KID) come from torchmetrics' FID and KID with that network's
penultimate layer as their feature extractor (the FID recipe with a domain feature extractor); conditional
accuracy asks the same network whether a generated image shows the class its prompt named. Both headline numbers
carry a bootstrap 95% confidence interval, so a gate can tell a real difference from sampling noise. The
hand-written `frechet_distance` stays only for the bootstrap (hundreds of resamples of features already
computed), and a test shows it equals torchmetrics' FID. A user who has CLIP weights on disk passes them as
`clip_path`: the same code path gives a Frechet distance in CLIP space.
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
from threadpoolctl import threadpool_limits

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
        if not (path / "feature_net.safetensors").exists():
            raise FileNotFoundError(f"no feature network at {path}: expected feature_net.safetensors and config.json "
                                    f"written by FeatureNet.save")
        net = cls(**json.loads((path / "config.json").read_text()))
        net.load_state_dict(load_file(path / "feature_net.safetensors"))
        return net.eval()


def train_feature_net(images: np.ndarray, labels: np.ndarray, num_classes: int, *, steps: int = 500,
                      batch_size: int = 64, lr: float = 2e-3, seed: int = 0) -> FeatureNet:
    """A classifier on the real training images (with small shifts as augmentation)."""
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    if len(labels) != len(images) or len(images) == 0:
        raise ValueError(f"need one label per image and at least one image, got {len(images)} images and "
                         f"{len(labels)} labels")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    from distillery.models.training import make_fabric

    fabric = make_fabric()
    torch.manual_seed(seed)
    # Under DDP each rank samples its own batches; BatchNorm normalizes with each rank's batch and the saved
    # running statistics are rank 0's (DDP broadcasts them every forward), as in any DDP training without SyncBN.
    gen = torch.Generator().manual_seed(seed + fabric.global_rank)
    net = FeatureNet(num_classes)
    model, opt = fabric.setup(net, torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt.optimizer, max_lr=lr, total_steps=steps)
    x_all, y_all = to_tensor(images), torch.from_numpy(np.asarray(labels)).long()
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(x_all), (batch_size,), generator=gen)
        dx, dy = torch.randint(-2, 3, (2,), generator=gen).tolist()
        x, y = fabric.to_device((torch.roll(x_all[idx], shifts=(dx, dy), dims=(2, 3)), y_all[idx]))
        loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        fabric.backward(loss)
        opt.step()
        sched.step()
    return net.cpu().float().eval()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) between two feature sets (rows are samples).

    Tr((S_a S_b)^1/2) equals Tr((S_a^1/2 S_b S_a^1/2)^1/2), whose argument is symmetric positive semidefinite:
    its eigenvalues (clipped at 0) give the trace without the complex parts and blow-ups that sqrtm of the
    non-symmetric product shows when there are fewer samples than feature dimensions."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"Frechet distance needs two (samples, features) arrays with the same feature size, "
                         f"got shapes {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"Frechet distance needs at least 2 samples per set, got {len(a)} and {len(b)}; "
                         f"generate or hold out more images")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("Frechet distance got NaN or infinite features; the images or the feature network are broken")
    # One BLAS thread: on matrices this small OpenBLAS's threads only spin against each other, and on 2 busy
    # cores that made one call ~170x slower (0.3 s instead of 2 ms), which the bootstrap repeats hundreds of times.
    with threadpool_limits(1, user_api="blas"):
        mu_a, mu_b = a.mean(0), b.mean(0)
        s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
        w, v = linalg.eigh(s_a)
        root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        inner = root_a @ s_b @ root_a
        tr_covmean = np.sqrt(np.clip(linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    d = float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_covmean)
    return max(d, 0.0)  # rounding can leave a tiny negative for identical sets


class _Extractor(nn.Module):
    """torchmetrics' FID/KID call their feature extractor on the image tensors given to `update`; this hands
    our uint8 (N, 3, H, W) tensors to an object with `.features(uint8 NHWC array)` (FeatureNet, ClipFeatures)."""

    def __init__(self, source, probe: np.ndarray):
        super().__init__()
        self.source = source
        self.num_features = int(source.features(probe[:1]).shape[1])

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.source.features(imgs.permute(0, 2, 3, 1).numpy())))


def distribution_metrics(source, generated: np.ndarray, real: np.ndarray, seed: int = 0) -> dict:
    """FD and KID (mean and std over subsets) between generated and real uint8 (N, H, W, 3) images in the
    feature space of `source`, by torchmetrics."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    generated, real = np.asarray(generated), np.asarray(real)
    if len(generated) < 2 or len(real) < 2:
        raise ValueError(f"Frechet distance needs at least 2 samples per set, got {len(generated)} and {len(real)}; "
                         f"generate or hold out more images")
    extractor = _Extractor(source, real)
    subset = min(1000, len(generated), len(real))
    fid = FrechetInceptionDistance(feature=extractor, reset_real_features=False)
    kid = KernelInceptionDistance(feature=extractor, subsets=50, subset_size=subset, reset_real_features=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # KID draws its subsets from torch's global generator
        for images, real_flag in ((real, True), (generated, False)):
            x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
            fid.update(x, real=real_flag)
            kid.update(x, real=real_flag)
        kid_mean, kid_std = kid.compute()
        fd = float(fid.compute())
    if not np.isfinite(fd):
        raise ValueError("Frechet distance is not finite; the images or the feature network are broken")
    return {"fd": max(fd, 0.0), "kid": float(kid_mean), "kid_std": float(kid_std)}


def bootstrap_ci(statistic, *samples: np.ndarray, rounds: int = 200, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic(*samples)`: each sample set is resampled with replacement."""
    rng = np.random.default_rng(seed)
    values = [statistic(*(s[rng.integers(0, len(s), len(s))] for s in samples)) for _ in range(rounds)]
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


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


class ClipFeatures:
    """Image embeddings of a CLIP vision model a user has on disk (a transformers `save_pretrained` folder of
    CLIPVisionModelWithProjection or CLIPVisionModel, safetensors), for a Frechet distance comparable across
    datasets. Same `.features(images)` interface as FeatureNet; nothing is downloaded."""

    MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's preprocessing constants
    STD = (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, path: str | Path):
        path = Path(path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"no CLIP vision model at {path}: pass a folder written by transformers' "
                                    f"save_pretrained (config.json + model.safetensors), or leave the path unset to "
                                    f"use the feature network trained on the real data")
        from transformers import AutoConfig, CLIPVisionModel, CLIPVisionModelWithProjection

        arch = (AutoConfig.from_pretrained(path, local_files_only=True).architectures or [""])[0]
        cls = CLIPVisionModelWithProjection if arch.endswith("WithProjection") else CLIPVisionModel
        self.model = cls.from_pretrained(path, local_files_only=True, use_safetensors=True).eval()
        self.size = int(self.model.config.image_size)
        pre = path / "preprocessor_config.json"
        conf = json.loads(pre.read_text()) if pre.exists() else {}
        self.mean = torch.tensor(conf.get("image_mean", self.MEAN)).view(1, 3, 1, 1)
        self.std = torch.tensor(conf.get("image_std", self.STD)).view(1, 3, 1, 1)

    @torch.no_grad()
    def features(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        out = []
        for i in range(0, len(images), batch_size):
            x = (to_tensor(images[i:i + batch_size]) + 1) / 2
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False).clamp(0, 1)
            res = self.model(pixel_values=(x - self.mean) / self.std)
            emb = res.image_embeds if hasattr(res, "image_embeds") else res.pooler_output
            out.append(emb.float().numpy())
        return np.concatenate(out)


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], *, steps: int, guidance_scale: float,
             resolution: int | None = None) -> np.ndarray:
    """uint8 (N, H, W, 3) images, one fixed seed per prompt so every evaluation sees the same noise."""
    size = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance_scale, height=size, width=size,
               generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np").images
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def evaluate_text_to_image(pipe, holdout, feature_net: FeatureNet, *, num_per_class: int, steps: int,
                           guidance_scale: float, seed: int = 0, clip_path: str | Path | None = None,
                           grid_per_class: int = 8, latency_probes: int = 3, generate_fn=None) -> dict:
    """Generate `num_per_class` images for every class prompt with fixed seeds and compare them with the
    held-out real images: Frechet and kernel distance in the feature network's space (`fd`, `kid`; also
    `fd_clip` when a CLIP vision model is given) with a bootstrap 95% interval for FD (`fd_ci_low/high`),
    conditional accuracy (does the feature network see the prompted class) with its interval, and UNet
    evaluations per image (counted, so guidance shows as 2 per step). Latency is reported twice, because the
    two answer different questions: `latency_s` is one image at batch 1 (median of `latency_probes` calls: what a
    user of the endpoint waits), `latency_batch_s` the per-image share of the batched generation (throughput).
    `generate_fn(prompts, seeds) -> uint8 images` replaces the pipeline's own sampling (e.g. a hybrid of two
    UNets); `unet_evals_per_image` still counts `pipe.unet`'s evaluations."""
    if generate_fn is None:
        def generate_fn(prompts, seeds):
            return generate(pipe, prompts, seeds, steps=steps, guidance_scale=guidance_scale)
    prompts = list(holdout.class_prompts)
    if not prompts:
        raise ValueError("the dataset has no class_prompts; evaluation needs one prompt per class")
    if feature_net.config["num_classes"] != len(prompts):
        raise ValueError(f"the feature network knows {feature_net.config['num_classes']} classes but the dataset "
                         f"has {len(prompts)} class prompts; train the feature network on this dataset")
    if num_per_class < 1 or steps < 1 or latency_probes < 1:
        raise ValueError(f"num_per_class, steps and latency_probes must be >= 1, got {num_per_class}, {steps} and "
                         f"{latency_probes}")
    if num_per_class * len(prompts) < 2 or len(holdout.images) < 2:
        raise ValueError(f"Frechet distance needs at least 2 generated and 2 held-out images, got "
                         f"{num_per_class * len(prompts)} and {len(holdout.images)}; raise num_per_class or the "
                         f"holdout fraction")
    clip = ClipFeatures(clip_path) if clip_path is not None else None  # fail before minutes of sampling

    rows = []  # UNet batch rows per call: counts what guidance really costs
    hook = pipe.unet.register_forward_hook(lambda _m, args, _o: rows.append(args[0].shape[0]))
    generated, seconds = [], 0.0
    try:
        for c, prompt in enumerate(prompts):
            seeds = [seed * 100_003 + c * num_per_class + i for i in range(num_per_class)]
            t = time.perf_counter()
            generated.append(generate_fn([prompt] * num_per_class, seeds))
            seconds += time.perf_counter() - t
    finally:
        hook.remove()
    images = np.concatenate(generated)
    single = []
    for i in range(latency_probes):
        t = time.perf_counter()
        generate_fn([prompts[i % len(prompts)]], [seed + i])
        single.append(time.perf_counter() - t)

    wanted = np.repeat(np.arange(len(prompts)), num_per_class)
    correct = (feature_net.predict(images) == wanted).astype(np.float64)
    fake, real = feature_net.features(images), feature_net.features(holdout.images)
    result = {
        **distribution_metrics(feature_net, images, holdout.images, seed=seed),
        "cond_acc": float(correct.mean()),
        "latency_s": float(np.median(single)),
        "latency_batch_s": seconds / len(images),
        "unet_evals_per_image": float(sum(rows)) / len(images),
        "num_generated": float(len(images)),
    }
    result["fd_ci_low"], result["fd_ci_high"] = bootstrap_ci(frechet_distance, fake, real, seed=seed)
    result["cond_acc_ci_low"], result["cond_acc_ci_high"] = bootstrap_ci(np.mean, correct, seed=seed)
    if clip is not None:
        result["fd_clip"] = distribution_metrics(clip, images, holdout.images, seed=seed)["fd"]
    k = min(grid_per_class, num_per_class)
    result["grid"] = make_grid([images[c * num_per_class + i] for c in range(len(prompts)) for i in range(k)], nrow=k)
    return result
