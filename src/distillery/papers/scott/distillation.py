"""Consistency distillation of a text-to-image latent diffusion teacher into a 1-4 step student.

One training loop, three methods (`DistillConfig.method`):

- ``cd-ode``: vanilla latent consistency distillation. The teacher moves x_t to x_s (s = t - skip) with one
  deterministic DDIM (ODE) step; the student f(x_t, t) is trained to match the EMA target f⁻(x_s, s).
- ``scott``: the teacher solver is stochastic — DDIM with noise strength eta (eta = 0 is the ODE step, eta = 1
  the ancestral / Euler–Maruyama step of the reverse SDE) — and solves the skipped interval in several
  sub-steps, which SCott finds gives a better target at few sampling steps.
- ``scott-adv``: SCott plus a hinge adversarial loss. The discriminator (`discriminator.py`) is built on the
  frozen teacher: the student's clean-latent estimate (or a real latent) is re-noised to a sampled timestep and
  trainable heads read the teacher UNet's features, conditioned on the text embedding and that timestep
  (``discriminator="teacher"``); ``"latent"`` is a standalone conv net on clean latents (the ablation).

The student uses the consistency parameterization f(x, t) = c_skip(t) x + c_out(t) x0(x, t) with the
scalings of diffusers' `LCMScheduler` (f(x, 0) = x), so it is saved as an ordinary `StableDiffusionPipeline`
with an `LCMScheduler` and samples in 1, 2 or 4 steps with the same predictor code as its teacher. Classifier-free
guidance (scale w) is distilled into it: the teacher solver uses guided noise predictions, the student is
called once per step and served with guidance 1.

The solver step is written out by hand because it is per-sample (each row of a batch has its own t and s);
`tests/test_scott.py` checks it against `DDIMScheduler.step`.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distillery.models import tiny_sd
from distillery.models.files import seal
from distillery.models.training import all_reduce_gradients, make_fabric, resumable_loop
from distillery.papers.scott.discriminator import DISCRIMINATORS, adversarial_losses, make_discriminator

METHODS = ("cd-ode", "scott", "scott-adv")


@dataclass(frozen=True)
class DistillConfig:
    method: str = "scott-adv"
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-4
    noise_strength: float = 0.3  # eta of the stochastic teacher solver (scott, scott-adv)
    solver_substeps: int = 2  # teacher solver steps per skipped interval (scott, scott-adv)
    skip: int = 20  # timesteps between the student's grid points: 1000 / 20 = 50 (LCM's original_inference_steps)
    guidance_scale: float = 3.0  # classifier-free guidance distilled into the student
    ema_decay: float = 0.95
    adv_weight: float = 0.1  # scott-adv only
    discriminator: str = "teacher"  # scott-adv only: "teacher" (frozen teacher features + heads) or "latent"
    disc_lr: float = 2e-4
    huber_c: float = 1e-3
    seed: int = 0

    def effective(self) -> "DistillConfig":
        """The method decides which parts are on: CD-ODE is one deterministic DDIM step and no adversary."""
        no_adversary = dict(adv_weight=0.0, discriminator=DistillConfig.discriminator)
        if self.method == "cd-ode":
            return replace(self, noise_strength=0.0, solver_substeps=1, **no_adversary)
        if self.method == "scott":
            return replace(self, **no_adversary)
        return self

    def check(self, num_train_timesteps: int = 1000) -> "DistillConfig":
        problems = []
        if self.method not in METHODS:
            problems.append(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("steps", "batch_size", "solver_substeps", "skip"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.lr < 1 or not 0 < self.disc_lr < 1:
            problems.append(f"lr and disc_lr must be in (0, 1), got {self.lr} and {self.disc_lr}")
        if not 0 <= self.noise_strength <= 1:
            problems.append(f"noise_strength must be in [0, 1], got {self.noise_strength}")
        if self.solver_substeps > self.skip:
            problems.append(f"solver_substeps ({self.solver_substeps}) cannot exceed skip ({self.skip})")
        if num_train_timesteps % self.skip:
            problems.append(f"skip must divide the teacher's {num_train_timesteps} training timesteps, got {self.skip}")
        if not 1 <= self.guidance_scale <= 30:
            problems.append(f"guidance_scale must be in [1, 30], got {self.guidance_scale}")
        if not 0 <= self.ema_decay < 1:
            problems.append(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.discriminator not in DISCRIMINATORS:
            problems.append(f"discriminator must be one of {DISCRIMINATORS}, got {self.discriminator!r}")
        if self.adv_weight < 0:
            problems.append(f"adv_weight must be >= 0, got {self.adv_weight}")
        if problems:
            raise ValueError("invalid distillation config: " + "; ".join(problems))
        return self


# --------------------------------------------------------------------------------------------- solver


def _at(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return alphas_cumprod[t].view(-1, 1, 1, 1)


def predicted_x0(eps: torch.Tensor, x_t: torch.Tensor, a_t: torch.Tensor) -> torch.Tensor:
    return (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()


def stochastic_ddim_step(eps: torch.Tensor, x_t: torch.Tensor, a_t: torch.Tensor, a_s: torch.Tensor,
                         noise_strength: float, noise: torch.Tensor) -> torch.Tensor:
    """x_t -> x_s (s < t) given the noise prediction: DDIM with eta = noise_strength (0: the probability-flow
    ODE step; 1: the ancestral SDE step). `a_t`, `a_s` are alphas_cumprod at t and s, broadcastable to x_t."""
    x0 = predicted_x0(eps, x_t, a_t)
    sigma = noise_strength * ((1 - a_s) / (1 - a_t)).sqrt() * (1 - a_t / a_s).clamp(min=0).sqrt()
    direction = (1 - a_s - sigma ** 2).clamp(min=0).sqrt() * eps
    return a_s.sqrt() * x0 + direction + sigma * noise


def guided_eps(unet, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
               guidance_scale: float) -> torch.Tensor:
    if guidance_scale == 1.0:
        return unet(x, t, encoder_hidden_states=cond).sample
    out = unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond, cond])).sample
    e_uncond, e_cond = out.chunk(2)
    return e_uncond + guidance_scale * (e_cond - e_uncond)


@torch.no_grad()
def teacher_solve(unet, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, cond: torch.Tensor,
                  uncond: torch.Tensor, alphas_cumprod: torch.Tensor, *, guidance_scale: float, noise_strength: float,
                  substeps: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Move x_t to x_s with the guided teacher in `substeps` equal (integer) sub-intervals per sample."""
    x = x_t
    for i in range(substeps):
        u = t - torch.div((t - s) * i, substeps, rounding_mode="floor")
        v = t - torch.div((t - s) * (i + 1), substeps, rounding_mode="floor")
        eps = guided_eps(unet, x, u, cond, uncond, guidance_scale)
        # Drawn on the generator's device (CPU) and moved, so a run samples the same noise on any accelerator.
        noise = torch.randn(x.shape, generator=generator).to(x) if noise_strength > 0 else torch.zeros_like(x)
        x = stochastic_ddim_step(eps, x, _at(alphas_cumprod, u), _at(alphas_cumprod, v), noise_strength, noise)
    return x


def consistency_fn(unet, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, scheduler,
                   alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """f(x, t) = c_skip(t) x + c_out(t) x0(x, t), with the LCMScheduler's scalings, so f(x, 0) = x exactly and the
    scheduler samples with the same function the student was trained as."""
    c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t.float())
    x0 = predicted_x0(unet(x, t, encoder_hidden_states=cond).sample, x, _at(alphas_cumprod, t))
    return c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1) * x0


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    return (torch.sqrt((a - b).pow(2).flatten(1).mean(1) + c ** 2) - c).mean()


# ------------------------------------------------------------------------------------------- train


def lcm_scheduler(teacher_scheduler_config, skip: int):
    """The teacher's noise schedule in an LCMScheduler whose grid is the student's (every `skip` timesteps)."""
    import inspect

    from diffusers import LCMScheduler

    accepted = inspect.signature(LCMScheduler.__init__).parameters
    config = {k: v for k, v in dict(teacher_scheduler_config).items() if k in accepted}
    n = int(config.get("num_train_timesteps", 1000))
    return LCMScheduler(**{**config, "original_inference_steps": n // skip, "timestep_spacing": "leading",
                           "steps_offset": 1, "set_alpha_to_one": True, "prediction_type": "epsilon",
                           "clip_sample": False})


def student_pipeline(teacher, student_unet, skip: int):
    """The teacher's VAE, text encoder and tokenizer with the student UNet and an LCMScheduler."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=teacher.vae, text_encoder=teacher.text_encoder, tokenizer=teacher.tokenizer,
                                   unet=student_unet, scheduler=lcm_scheduler(teacher.scheduler.config, skip),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def load_teacher(teacher_dir: Path):
    from diffusers import StableDiffusionPipeline

    if not (Path(teacher_dir) / "model_index.json").exists():
        raise FileNotFoundError(f"no diffusers pipeline at {teacher_dir} (model_index.json missing): pass the model "
                                f"folder of a tiny-sd run or a StableDiffusionPipeline saved with save_pretrained")
    return StableDiffusionPipeline.from_pretrained(teacher_dir, use_safetensors=True)


def distill(teacher_dir: Path, dataset, out_dir: Path, cfg: DistillConfig, *, checkpoint_dir: Path | None = None,
            checkpoint_every: int = 100, on_log=None, log_every: int = 20, max_steps: int = 8) -> dict:
    """Distill the teacher pipeline at `teacher_dir` on `dataset` (images + captions); save the student pipeline
    to `out_dir`. Resumes from `checkpoint_dir` like the teacher's own training."""
    teacher = load_teacher(Path(teacher_dir))
    sched = lcm_scheduler(teacher.scheduler.config, cfg.skip)
    n_train = int(sched.config.num_train_timesteps)
    cfg = cfg.effective().check(n_train)
    size = teacher.unet.config.sample_size * teacher.vae_scale_factor
    images = getattr(dataset, "images", None)
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise ValueError(f"the teacher makes {size}x{size} RGB images; the dataset holds "
                         f"{getattr(images, 'shape', type(images).__name__)}: build it at resolution {size}")
    captions = list(getattr(dataset, "captions", []))
    if len(captions) != len(images) or not all(isinstance(c, str) and c.strip() for c in captions):
        raise ValueError("distillation needs one non-empty caption per image")

    fabric = make_fabric()
    torch.manual_seed(cfg.seed)
    mean, std = tiny_sd.encode_latents(teacher.vae, images)
    unique, embeddings = tiny_sd.encode_captions(captions, encoder=teacher.text_encoder, tokenizer=teacher.tokenizer)
    index = {c: i for i, c in enumerate(unique)}
    cap_idx = torch.tensor([index[c] for c in captions])
    empty = embeddings[index[""]]

    teacher_unet = teacher.unet.eval().requires_grad_(False)
    student = copy.deepcopy(teacher_unet).train().requires_grad_(True)
    target = copy.deepcopy(teacher_unet).eval().requires_grad_(False)  # EMA of the student
    parts = {"student": student, "target": target}
    # Student and discriminator each have an optimizer of their own. The student is a DDP module under several
    # processes; the discriminator stays a plain module whose gradients are averaged by hand after its backward
    # (the teacher-feature one is entered through `features`/`logits`, which a DDP wrapper would not see). The
    # frozen teacher and the EMA target are plain modules: the target follows the synced student on every rank.
    student_ddp, opt = fabric.setup(student, torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0))
    optimizers, disc = {"optimizer": opt}, None
    if cfg.adv_weight > 0:
        disc = fabric.to_device(make_discriminator(cfg.discriminator, teacher_unet, embeddings.shape[-1]))
        parts["discriminator"] = disc
        optimizers["disc_optimizer"] = fabric.setup_optimizers(torch.optim.AdamW(
            disc.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.999), weight_decay=0.0))
    model = nn.ModuleDict(parts)  # every trained part, for the checkpoint
    target, teacher_unet = fabric.to_device(target), fabric.to_device(teacher_unet)
    ac = fabric.to_device(sched.alphas_cumprod.float())
    grid = torch.arange(1, n_train // cfg.skip + 1) * cfg.skip - 1  # the timesteps LCMScheduler samples at
    gen = torch.Generator().manual_seed(cfg.seed + fabric.global_rank)  # each rank its own batches and noise

    def adversary_draw(t: torch.Tensor) -> tuple:
        """The latent discriminator judges clean latents at the student's t; the teacher-feature one its own
        re-noising timestep (uniform on the student's grid) and noise."""
        if not getattr(disc, "renoises", False):
            return (t,)
        t_adv = grid[torch.randint(len(grid), (len(t),), generator=gen)]
        t_adv, noise = fabric.to_device((t_adv, torch.randn((len(t), *mean.shape[1:]), generator=gen)))
        return t_adv, noise, ac

    def step_fn(_: int) -> dict:
        b = cfg.batch_size
        idx = torch.randint(len(mean), (b,), generator=gen)
        z0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
        cond = embeddings[cap_idx[idx]]
        t = grid[torch.randint(len(grid), (b,), generator=gen)]
        z0, cond, t, noise = fabric.to_device((z0, cond, t, torch.randn(z0.shape, generator=gen)))
        s = (t - cfg.skip).clamp(min=0)
        a_t = _at(ac, t)
        x_t = a_t.sqrt() * z0 + (1 - a_t).sqrt() * noise
        with torch.no_grad():
            x_s = teacher_solve(teacher_unet, x_t, t, s, cond, fabric.to_device(empty).expand_as(cond), ac,
                                guidance_scale=cfg.guidance_scale, noise_strength=cfg.noise_strength,
                                substeps=cfg.solver_substeps, generator=gen)
            goal = consistency_fn(target, x_s, s, cond, sched, ac)
        pred = consistency_fn(student_ddp, x_t, t, cond, sched, ac)
        loss_cd = pseudo_huber(pred.float(), goal.float(), cfg.huber_c)
        loss, adv = loss_cd, {}
        opt.zero_grad(set_to_none=True)
        if disc is not None:
            g_loss, d_loss, adv = adversarial_losses(disc, pred, z0, cond, *adversary_draw(t))
            loss = loss + cfg.adv_weight * g_loss
        fabric.backward(loss, inputs=list(student.parameters()))  # the generator loss must not train the discriminator
        if disc is not None:
            optimizers["disc_optimizer"].zero_grad(set_to_none=True)
            fabric.backward(d_loss, inputs=list(disc.parameters()))
            all_reduce_gradients(fabric, disc)
            optimizers["disc_optimizer"].step()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for p_target, p_student in zip(target.parameters(), student.parameters()):
                p_target.lerp_(p_student, 1 - cfg.ema_decay)
        return {"loss": loss_cd.item(), **adv}

    # `steps` is left out: the first k steps do not depend on it (constant lr), so a longer run continues a
    # shorter one's checkpoint (the sweep's successive-halving rungs train the same trial further). The optimizers
    # are in: a checkpoint of the one-optimizer loop is refused clearly.
    fingerprint = dict(cfg=asdict(replace(cfg, steps=0)), teacher=str(teacher.unet.config), data=len(images),
                       optimizers=sorted(optimizers))
    metrics = resumable_loop(cfg.method, model, optimizers, cfg.steps, checkpoint_dir, checkpoint_every, gen,
                             step_fn, on_log, log_every, fingerprint, fabric=fabric)
    student = parts["student"].cpu().float().eval().requires_grad_(False)
    teacher.unet.cpu()
    out = Path(out_dir)
    if fabric.is_global_zero:
        student_pipeline(teacher, student, cfg.skip).save_pretrained(out, safe_serialization=True)
        (out / "distillery.json").write_text(json.dumps({
            "kind": "text-to-image", "default_steps": 2, "max_steps": max_steps, "default_guidance": 1.0,
            "max_guidance": 1.0, "resolution": size, "method": cfg.method,
            "distilled_guidance_scale": cfg.guidance_scale}))
        seal(out)
    fabric.barrier()
    return {**{k.replace(f"{cfg.method}_", "distill_"): v for k, v in metrics.items()},
            "noise_strength": cfg.noise_strength, "adv_weight": cfg.adv_weight}
