"""Tiny Stable Diffusion: a real diffusers StableDiffusionPipeline with a tiny AutoencoderKL and
UNet2DConditionModel trained here and the frozen MiniLM text encoder. Because it is the standard
pipeline, schedulers, LoRA, ControlNet and a real SD-1.5 checkpoint plug in unchanged.

Training runs on Lightning Fabric (distillery.models.training: devices, precision, DDP from the settings) and
resumes: started again with the same checkpoint folder after an interruption, a loop ends with the weights an
uninterrupted run would have.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from distillery.models.files import seal, share_readable
from distillery.models.training import LogFn, make_fabric, resumable_loop


@dataclass(frozen=True)
class TinySDConfig:
    resolution: int = 32
    latent_channels: int = 4
    vae_channels: tuple[int, ...] = (16, 32, 64)  # 3 levels: latents are resolution / 4
    vae_norm_groups: int = 8
    unet_channels: tuple[int, ...] = (64, 128)
    norm_groups: int = 16
    cross_attention_dim: int = 384  # MiniLM hidden size
    attention_head_dim: int = 8
    train_timesteps: int = 1000

    @property
    def latent_size(self) -> int:
        return self.resolution // 2 ** (len(self.vae_channels) - 1)


def build_vae(cfg: TinySDConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=cfg.vae_channels,
                         layers_per_block=1, latent_channels=cfg.latent_channels, norm_num_groups=cfg.vae_norm_groups,
                         sample_size=cfg.resolution)


def build_unet(cfg: TinySDConfig):
    from diffusers import UNet2DConditionModel

    n = len(cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=cfg.latent_size, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
        block_out_channels=cfg.unet_channels, layers_per_block=1, norm_num_groups=cfg.norm_groups,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=cfg.cross_attention_dim, attention_head_dim=cfg.attention_head_dim)


def train_scheduler(cfg: TinySDConfig):
    from diffusers import DDPMScheduler

    # Stable Diffusion's own noise schedule, so a real SD checkpoint and these models share sampling code.
    return DDPMScheduler(num_train_timesteps=cfg.train_timesteps, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", clip_sample=False, prediction_type="epsilon",
                         steps_offset=1)


def assemble(vae, unet, cfg: TinySDConfig):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from distillery.models.text_encoder import load_text_encoder

    encoder, tokenizer = load_text_encoder()
    scheduler = DPMSolverMultistepScheduler.from_config(train_scheduler(cfg).config)
    return StableDiffusionPipeline(vae=vae, text_encoder=encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def build_pipeline(cfg: TinySDConfig | None = None, seed: int = 0):
    """An untrained pipeline (tests, serving fixtures); the architecture of every trained one."""
    cfg = cfg or TinySDConfig()
    torch.manual_seed(seed)
    return assemble(build_vae(cfg), build_unet(cfg), cfg)


# ----------------------------------------------------------------------------------------------- data


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def encode_captions(captions: list[str], batch_size: int = 256, encoder=None,
                    tokenizer=None) -> tuple[list[str], torch.Tensor]:
    """Unique captions (plus the empty one for guidance) -> their token embeddings from the frozen text encoder
    (MiniLM unless a pipeline's own encoder and tokenizer are given)."""
    from distillery.models.text_encoder import load_text_encoder

    if encoder is None or tokenizer is None:
        encoder, tokenizer = load_text_encoder()
    unique = sorted(set(captions) | {""})
    out = []
    for i in range(0, len(unique), batch_size):
        tok = tokenizer(unique[i:i + batch_size], padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt")
        out.append(encoder(tok.input_ids, attention_mask=tok.attention_mask)[0])
    return unique, torch.cat(out)


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the VAE posterior for every image, already multiplied by the VAE's scaling factor."""
    x = to_tensor(images)
    posts = [vae.encode(x[i:i + batch_size]).latent_dist for i in range(0, len(x), batch_size)]
    scale = vae.config.scaling_factor
    return torch.cat([p.mean for p in posts]) * scale, torch.cat([p.std for p in posts]) * scale


def _check_training_args(dataset, cfg: TinySDConfig, *, steps: int, batch_size: int, lr: float,
                         checkpoint_every: int, log_every: int, captions: bool) -> None:
    images = getattr(dataset, "images", None)
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError("dataset.images must be a uint8 array (N, H, W, 3); got "
                         f"{getattr(images, 'dtype', type(images).__name__)} {getattr(images, 'shape', '')}")
    if len(images) == 0:
        raise ValueError("the dataset has no images (is the train split empty?)")
    if images.shape[1:3] != (cfg.resolution, cfg.resolution):
        raise ValueError(f"images are {images.shape[1]}x{images.shape[2]} but the model is built for "
                         f"{cfg.resolution}x{cfg.resolution}; set TinySDConfig(resolution=...) to the dataset's")
    if captions:
        caps = list(getattr(dataset, "captions", []))
        if len(caps) != len(images):
            raise ValueError(f"need one caption per image, got {len(caps)} captions for {len(images)} images")
        if not all(isinstance(c, str) and c.strip() for c in caps):
            raise ValueError("captions must be non-empty strings (the empty caption is reserved for guidance)")
    for field_name, value in (("steps", steps), ("batch_size", batch_size), ("checkpoint_every", checkpoint_every),
                              ("log_every", log_every)):
        if int(value) < 1:
            raise ValueError(f"{field_name} must be >= 1, got {value}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")


# ------------------------------------------------------------------------------------------------- VAE


def train_vae(dataset, out_dir: Path, *, cfg: TinySDConfig, steps: int, batch_size: int = 32, lr: float = 1e-3,
              kl_weight: float = 1e-4, seed: int = 0, checkpoint_dir: Path | None = None, checkpoint_every: int = 100,
              on_log: LogFn | None = None, log_every: int = 20) -> dict:
    """Reconstruction (L1 + MSE) plus a small KL term; the latents' scale is recorded as `scaling_factor`."""
    _check_training_args(dataset, cfg, steps=steps, batch_size=batch_size, lr=lr, checkpoint_every=checkpoint_every,
                         log_every=log_every, captions=False)
    fabric = make_fabric()
    torch.manual_seed(seed)
    vae = build_vae(cfg)
    objective, opt = fabric.setup(_VAEObjective(vae, kl_weight), torch.optim.AdamW(vae.parameters(), lr=lr,
                                                                                   weight_decay=0.0))
    gen = torch.Generator().manual_seed(seed + fabric.global_rank)  # each rank its own batches
    x_all = to_tensor(dataset.images)
    down = 2 ** (len(vae.config.block_out_channels) - 1)

    def step_fn(_: int) -> dict:
        x = x_all[torch.randint(len(x_all), (batch_size,), generator=gen)]
        eps = torch.randn((batch_size, cfg.latent_channels, x.shape[2] // down, x.shape[3] // down), generator=gen)
        loss = objective(fabric.to_device(x), fabric.to_device(eps))
        opt.zero_grad(set_to_none=True)
        fabric.backward(loss)
        opt.step()
        return {"loss": loss.item()}

    metrics = resumable_loop("vae", objective, opt, steps, checkpoint_dir, checkpoint_every, gen, step_fn, on_log,
                             log_every, dict(cfg=asdict(cfg), batch_size=batch_size, lr=lr, kl_weight=kl_weight,
                                             seed=seed), fabric=fabric)
    vae = vae.cpu().float()
    with torch.no_grad():
        sample = x_all[:256]
        post = vae.encode(sample).latent_dist
        scale = 1.0 / float(post.mean.std())
        metrics["vae_recon_mse"] = float(F.mse_loss(vae.decode(post.mean).sample, sample))
    vae.register_to_config(scaling_factor=scale)
    metrics["vae_scaling_factor"] = scale
    if fabric.is_global_zero:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        vae.save_pretrained(out_dir)
        (Path(out_dir) / "tiny_sd_config.json").write_text(json.dumps(asdict(cfg)))
        share_readable(out_dir)
    fabric.barrier()
    return metrics


class _VAEObjective(torch.nn.Module):
    """The VAE's training loss as one forward, so DDP sees encoder and decoder in a single call."""

    def __init__(self, vae, kl_weight: float):
        super().__init__()
        self.vae, self.kl_weight = vae, kl_weight

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        post = self.vae.encode(x).latent_dist
        rec = self.vae.decode(post.mean + post.std * eps).sample
        return F.l1_loss(rec, x) + F.mse_loss(rec, x) + self.kl_weight * post.kl().mean()


@torch.no_grad()
def reconstruct(vae_dir: Path, images: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    x = to_tensor(images)
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample
    return list(images), list(to_uint8(rec))


# ------------------------------------------------------------------------------------------------ UNet


def train_unet(dataset, vae_dir: Path, out_dir: Path, *, cfg: TinySDConfig, steps: int, batch_size: int = 32,
               lr: float = 5e-4, cond_dropout: float = 0.1, seed: int = 0, checkpoint_dir: Path | None = None,
               checkpoint_every: int = 100, on_log: LogFn | None = None, log_every: int = 20) -> dict:
    """Epsilon-prediction denoising of VAE latents conditioned on the caption's MiniLM embedding. Captions are
    dropped to "" with probability `cond_dropout`, the unconditional input classifier-free guidance uses."""
    from diffusers import AutoencoderKL

    _check_training_args(dataset, cfg, steps=steps, batch_size=batch_size, lr=lr, checkpoint_every=checkpoint_every,
                         log_every=log_every, captions=True)
    if not 0 <= cond_dropout < 1:
        raise ValueError(f"cond_dropout must be in [0, 1), got {cond_dropout}")
    if not (Path(vae_dir) / "config.json").exists():
        raise FileNotFoundError(f"no VAE at {vae_dir}: pass the out_dir of train_vae "
                                f"(a diffusers AutoencoderKL folder)")
    torch.manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    if vae.config.latent_channels != cfg.latent_channels:
        raise ValueError(f"the VAE in {vae_dir} has {vae.config.latent_channels} latent channels, the config "
                         f"{cfg.latent_channels}; train the VAE and UNet with the same TinySDConfig")
    mean, std = encode_latents(vae, dataset.images)
    unique, embeddings = encode_captions(list(dataset.captions))
    index = {c: i for i, c in enumerate(unique)}
    cap_idx = torch.tensor([index[c] for c in dataset.captions])
    empty = index[""]

    fabric = make_fabric()
    unet = build_unet(cfg)
    noise_sched = train_scheduler(cfg)
    model, opt = fabric.setup(unet, torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2))
    gen = torch.Generator().manual_seed(seed + fabric.global_rank)  # each rank its own batches

    def step_fn(_: int) -> dict:
        idx = torch.randint(len(mean), (batch_size,), generator=gen)
        z0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch_size,), generator=gen)
        drop = torch.rand(batch_size, generator=gen) < cond_dropout
        cond = embeddings[torch.where(drop, torch.full_like(cap_idx[idx], empty), cap_idx[idx])]
        z_t, t, cond, noise = fabric.to_device((noise_sched.add_noise(z0, noise, t), t, cond, noise))
        loss = F.mse_loss(model(z_t, t, encoder_hidden_states=cond).sample.float(), noise)
        opt.zero_grad(set_to_none=True)
        fabric.backward(loss)
        fabric.clip_gradients(model, opt, max_norm=1.0)
        opt.step()
        return {"loss": loss.item()}

    metrics = resumable_loop("unet", model, opt, steps, checkpoint_dir, checkpoint_every, gen, step_fn, on_log,
                             log_every, dict(cfg=asdict(cfg), batch_size=batch_size, lr=lr, cond_dropout=cond_dropout,
                                             seed=seed, vae_scaling_factor=vae.config.scaling_factor), fabric=fabric)
    if fabric.is_global_zero:
        pipe = assemble(vae, unet.cpu().float(), cfg)
        pipe.save_pretrained(out_dir, safe_serialization=True)
        (Path(out_dir) / "distillery.json").write_text(json.dumps({"kind": "text-to-image", "default_steps": 25,
                                                                    "max_steps": 100, "resolution": cfg.resolution}))
        seal(out_dir)  # the predictor refuses the folder if a file changes later
    fabric.barrier()
    return metrics
