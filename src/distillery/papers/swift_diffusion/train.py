"""Training the add-ons on a base model (a diffusers StableDiffusionPipeline folder), on Lightning Fabric.

Both add-ons keep the base frozen and learn the base's own objective (epsilon prediction of VAE latents conditioned
on the caption, captions dropped to "" with `cond_dropout` for classifier-free guidance):
- a LoRA (peft, UNet layers only) on the images transformed by one style (`addons.STYLES`), saved with diffusers'
  `save_lora_weights` (safetensors, alpha stored in the file's metadata);
- a ControlNet made with `ControlNetModel.from_unet` (a copy of the base's down and mid blocks plus zero
  convolutions), fed the edge map of the image (`addons.edge_map`), its residuals added to the frozen UNet's; saved
  with `save_pretrained` (safetensors).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from distillery.models import tiny_sd
from distillery.models.files import share_readable
from distillery.models.training import LogFn, make_fabric, resumable_loop
from distillery.papers.swift_diffusion.addons import edge_map, stylize

# The UNet's attention projections, feed-forward layers and ResNet convolutions: a style that recolours the whole
# image needs the convolutions, not only attention.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1",
                "conv2")


@dataclass(frozen=True)
class AddonTrainConfig:
    steps: int = 300  # optimizer steps
    batch_size: int = 16
    lr: float = 1e-3
    cond_dropout: float = 0.1  # captions dropped to "" so guidance still works with the add-on
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 20

    def check(self) -> "AddonTrainConfig":
        problems = [f"{n} must be >= 1, got {getattr(self, n)}"
                    for n in ("steps", "batch_size", "checkpoint_every", "log_every") if int(getattr(self, n)) < 1]
        if not 0 < self.lr < 1:
            problems.append(f"lr must be in (0, 1), got {self.lr}")
        if not 0 <= self.cond_dropout < 1:
            problems.append(f"cond_dropout must be in [0, 1), got {self.cond_dropout}")
        problems += self._more_problems()
        if problems:
            raise ValueError(f"invalid {type(self).__name__}: " + "; ".join(problems))
        return self

    def _more_problems(self) -> list[str]:
        return []


@dataclass(frozen=True)
class LoRATrainConfig(AddonTrainConfig):
    style: str = "inverted"  # one of addons.STYLES
    rank: int = 4
    alpha: float = 4.0  # the update is (alpha / rank) * B A
    target_modules: tuple[str, ...] = field(default=LORA_TARGETS)

    def _more_problems(self) -> list[str]:
        from distillery.papers.swift_diffusion.addons import STYLES

        problems = [] if self.style in STYLES else [f"style must be one of {sorted(STYLES)}, got {self.style!r}"]
        if int(self.rank) < 1:
            problems.append(f"rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            problems.append(f"alpha must be > 0, got {self.alpha}")
        if not self.target_modules:
            problems.append("target_modules must name at least one UNet layer")
        return problems


@dataclass(frozen=True)
class ControlNetTrainConfig(AddonTrainConfig):
    lr: float = 5e-4


def _load_base(base_dir: Path, dataset):
    from diffusers import StableDiffusionPipeline

    if not (Path(base_dir) / "model_index.json").exists():
        raise FileNotFoundError(f"no base model at {base_dir}: pass a diffusers StableDiffusionPipeline folder")
    pipe = StableDiffusionPipeline.from_pretrained(base_dir, torch_dtype=torch.float32, use_safetensors=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    images = getattr(dataset, "images", None)
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[1:] != (size, size, 3) \
            or images.dtype != np.uint8 or not len(images):
        raise ValueError(f"dataset.images must be a non-empty uint8 array (N, {size}, {size}, 3) for this base model, "
                         f"got {getattr(images, 'dtype', type(images).__name__)} {getattr(images, 'shape', '')}")
    if len(list(dataset.captions)) != len(images):
        raise ValueError(f"need one caption per image, got {len(list(dataset.captions))} for {len(images)} images")
    return pipe


class _Denoising:
    """Noised latents, timesteps and (sometimes dropped) caption embeddings of a random batch, as in train_unet."""

    def __init__(self, pipe, images: np.ndarray, captions: list[str], cfg: AddonTrainConfig, gen: torch.Generator):
        self.mean, self.std = tiny_sd.encode_latents(pipe.vae, images)
        unique, self.embeddings = tiny_sd.encode_captions(captions, encoder=pipe.text_encoder,
                                                          tokenizer=pipe.tokenizer)
        index = {c: i for i, c in enumerate(unique)}
        self.cap_idx, self.empty = torch.tensor([index[c] for c in captions]), index[""]
        self.sched = tiny_sd.train_scheduler(tiny_sd.TinySDConfig(
            train_timesteps=pipe.scheduler.config.num_train_timesteps))
        self.cfg, self.gen = cfg, gen

    def batch(self):
        n, gen = self.cfg.batch_size, self.gen
        idx = torch.randint(len(self.mean), (n,), generator=gen)
        z0 = self.mean[idx] + self.std[idx] * torch.randn(self.mean[idx].shape, generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, self.sched.config.num_train_timesteps, (n,), generator=gen)
        drop = torch.rand(n, generator=gen) < self.cfg.cond_dropout
        cond = self.embeddings[torch.where(drop, torch.full_like(self.cap_idx[idx], self.empty), self.cap_idx[idx])]
        return idx, self.sched.add_noise(z0, noise, t), t, cond, noise


def _setup(dataset, base_dir: Path, cfg: AddonTrainConfig, transform=lambda images: images):
    """Checked config and data, the base pipeline, the launched Fabric and the batches of the (transformed) images,
    each rank its own."""
    cfg.check()
    pipe = _load_base(base_dir, dataset)
    fabric = make_fabric()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + fabric.global_rank)
    return pipe, fabric, _Denoising(pipe, transform(dataset.images), list(dataset.captions), cfg, gen)


def _run(name: str, model, params, data: _Denoising, cfg: AddonTrainConfig, checkpoint_dir, on_log, fabric, extra,
         fingerprint: dict) -> dict:
    """The shared loop: AdamW on the add-on's parameters only, gradients clipped, resumable."""
    model, opt = fabric.setup(model, torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0))

    def step_fn(_: int) -> dict:
        idx, z_t, t, cond, noise = data.batch()
        z_t, t, cond, noise, *more = fabric.to_device((z_t, t, cond, noise, *extra(idx)))
        loss = F.mse_loss(model(z_t, t, cond, *more).float(), noise)
        opt.zero_grad(set_to_none=True)
        fabric.backward(loss)
        fabric.clip_gradients(model, opt, max_norm=1.0)
        opt.step()
        return {"loss": loss.item()}

    return resumable_loop(name, model, opt, cfg.steps, checkpoint_dir, cfg.checkpoint_every, data.gen, step_fn,
                          on_log, cfg.log_every, {**asdict(cfg), **fingerprint}, fabric=fabric)


class _LoRAObjective(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, z_t, t, cond):
        return self.unet(z_t, t, encoder_hidden_states=cond).sample


def train_lora(dataset, base_dir: Path, out_dir: Path, cfg: LoRATrainConfig, *, checkpoint_dir: Path | None = None,
               on_log: LogFn | None = None) -> dict:
    """A UNet-only LoRA that turns the base's images into `cfg.style`; writes
    `out_dir/pytorch_lora_weights.safetensors`."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe, fabric, data = _setup(dataset, base_dir, cfg, lambda images: stylize(images, cfg.style))
    unet = pipe.unet
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights="gaussian",
                                target_modules=list(cfg.target_modules)))
    params = [p for p in unet.parameters() if p.requires_grad]
    metrics = _run("lora", _LoRAObjective(unet), params, data, cfg, checkpoint_dir, on_log, fabric, lambda idx: (),
                   {"base": str(base_dir)})
    metrics["lora_parameters"] = sum(p.numel() for p in params)
    if fabric.is_global_zero:
        # peft's key names (lora_A / lora_B): diffusers 0.42 loads them for every layer, while its older
        # lora.down / lora.up names lose the attention projections of this UNet on load.
        layers = get_peft_model_state_dict(unet.cpu())
        StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=layers, safe_serialization=True,
                                                  unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
        share_readable(out_dir)
    fabric.barrier()
    return metrics


class _ControlNetObjective(torch.nn.Module):
    """ControlNet residuals into the frozen UNet, as one forward so DDP sees the trained part in a single call."""

    def __init__(self, controlnet, unet):
        super().__init__()
        self.controlnet, self.unet = controlnet, unet

    def forward(self, z_t, t, cond, hint):
        down, mid = self.controlnet(z_t, t, encoder_hidden_states=cond, controlnet_cond=hint, return_dict=False)
        return self.unet(z_t, t, encoder_hidden_states=cond, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample


def conditioning_channels(vae_scale_factor: int) -> tuple[int, ...]:
    """Widths of the ControlNet's condition encoder: one stride-2 stage per halving from image to latent size."""
    return tuple(min(16 * 2 ** i, 256) for i in range(int(math.log2(vae_scale_factor)) + 1))


def train_controlnet(dataset, base_dir: Path, out_dir: Path, cfg: ControlNetTrainConfig, *,
                     checkpoint_dir: Path | None = None, on_log: LogFn | None = None) -> dict:
    """A ControlNet that makes the base follow edge maps; writes a diffusers ControlNetModel folder to `out_dir`."""
    from diffusers import ControlNetModel

    pipe, fabric, data = _setup(dataset, base_dir, cfg)
    hints = torch.from_numpy(edge_map(dataset.images)).permute(0, 3, 1, 2).float() / 255.0  # [0, 1] as diffusers
    controlnet = ControlNetModel.from_unet(pipe.unet,
                                           conditioning_embedding_out_channels=conditioning_channels(
                                               pipe.vae_scale_factor))
    pipe.unet.requires_grad_(False)
    metrics = _run("controlnet", _ControlNetObjective(controlnet, pipe.unet), list(controlnet.parameters()), data, cfg,
                   checkpoint_dir, on_log, fabric, lambda idx: (hints[idx],), {"base": str(base_dir)})
    metrics["controlnet_parameters"] = sum(p.numel() for p in controlnet.parameters())
    if fabric.is_global_zero:
        controlnet.cpu().float().save_pretrained(out_dir, safe_serialization=True)
        share_readable(out_dir)
    fabric.barrier()
    return metrics
