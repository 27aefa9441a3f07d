"""BK-SDM knowledge distillation of the pruned UNet from its teacher, and the lightweight VAE (Hybrid SD).

KD: L = w_denoise * MSE(eps_s, eps) + w_out * MSE(eps_s, eps_t) + w_feat * sum_b MSE(f_s^b, f_t^b), the features
taken by forward hooks at the output of every down block, the mid block and every up block that the student still
has (pruning keeps block widths, so those match the teacher's one to one; a removed block has no term, as in
BK-SDM). All weights are 1, as in the paper.

Tiny VAE: a diffusers `AutoencoderTiny` (TAESD's architecture) working in the teacher's diffusion latent space
(scaling_factor 1). Its encoder is trained with L1 to the teacher VAE's scaled posterior mean; its decoder on those
latents scaled by (1 - u), u ~ U[0, 0.25] ("latent degradation", so it tolerates the small model's less exact
latents), with an L1 reconstruction loss plus a hinge adversarial loss from a small patch discriminator.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from distillery.models import tiny_sd
from distillery.models.files import share_readable
from distillery.models.training import LogFn, make_fabric, resumable_loop


@dataclass(frozen=True)
class KDConfig:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 2e-4
    w_denoise: float = 1.0
    w_out: float = 1.0  # output KD: student noise prediction vs teacher's
    w_feat: float = 1.0  # feature KD summed over matched blocks
    cond_dropout: float = 0.1  # keep the unconditional branch trained for guidance
    seed: int = 0

    def check(self) -> "KDConfig":
        problems = [f"{n} must be >= 1, got {getattr(self, n)}" for n in ("steps", "batch_size")
                    if int(getattr(self, n)) < 1]
        if not 0 < self.lr < 1:
            problems.append(f"lr must be in (0, 1), got {self.lr}")
        problems += [f"{n} must be >= 0, got {getattr(self, n)}" for n in ("w_denoise", "w_out", "w_feat")
                     if getattr(self, n) < 0]
        if not 0 <= self.cond_dropout < 1:
            problems.append(f"cond_dropout must be in [0, 1), got {self.cond_dropout}")
        if problems:
            raise ValueError("invalid KD config: " + "; ".join(problems))
        return self


def feature_blocks(unet) -> list[str]:
    """The blocks whose outputs are matched: a removed mid block (`mid_block_type: null`) is left out."""
    mid = ["mid_block"] if unet.mid_block is not None else []
    return ([f"down_blocks.{i}" for i in range(len(unet.down_blocks))] + mid
            + [f"up_blocks.{i}" for i in range(len(unet.up_blocks))])


class FeatureTap:
    """Forward hooks that keep the output of named blocks (a down block's hidden state, not its skip list)."""

    def __init__(self, unet, names: list[str]):
        self.features: dict[str, torch.Tensor] = {}
        modules = dict(unet.named_modules())
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def hook(_module, _args, out):
            self.features[name] = out[0] if isinstance(out, tuple) else out
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


class _KDObjective(nn.Module):
    """Student forward, teacher forward (no grad) and the three loss terms, in one call for DDP."""

    def __init__(self, student, teacher, cfg: KDConfig):
        super().__init__()
        self.student, self.cfg = student, cfg
        self.teacher = [teacher]  # not a submodule: frozen, never handed to the optimizer or DDP
        names = feature_blocks(student)
        self.tap_s, self.tap_t = FeatureTap(student, names), FeatureTap(teacher, names)

    def forward(self, z_t, t, cond, noise):
        with torch.no_grad():
            eps_t = self.teacher[0](z_t, t, encoder_hidden_states=cond).sample
        eps_s = self.student(z_t, t, encoder_hidden_states=cond).sample
        denoise = F.mse_loss(eps_s.float(), noise)
        out = F.mse_loss(eps_s.float(), eps_t.float())
        feat = sum(F.mse_loss(self.tap_s.features[n].float(), self.tap_t.features[n].float())
                   for n in self.tap_s.features)
        total = self.cfg.w_denoise * denoise + self.cfg.w_out * out + self.cfg.w_feat * feat
        return total, {"loss_denoise": denoise.detach(), "loss_out_kd": out.detach(), "loss_feat_kd": feat.detach()}


def distill_unet(teacher_dir: Path, student, dataset, cfg: KDConfig, *, checkpoint_dir: Path | str | None = None,
                 on_log: LogFn | None = None, log_every: int = 20, checkpoint_every: int = 100):
    """Train `student` (a pruned copy of the teacher's UNet) with the BK-SDM loss on the dataset's latents.
    Returns (student, metrics); each loss term's recent mean is logged through `on_log`."""
    from diffusers import StableDiffusionPipeline

    cfg.check()
    teacher = StableDiffusionPipeline.from_pretrained(teacher_dir)
    mean, std = tiny_sd.encode_latents(teacher.vae, dataset.images)
    unique, embeddings = tiny_sd.encode_captions(list(dataset.captions), encoder=teacher.text_encoder,
                                                 tokenizer=teacher.tokenizer)
    index = {c: i for i, c in enumerate(unique)}
    cap_idx = torch.tensor([index[c] for c in dataset.captions])
    empty = index[""]
    noise_sched = tiny_sd.train_scheduler(tiny_sd.TinySDConfig())
    noise_sched = type(noise_sched).from_config(teacher.scheduler.config)  # the teacher's own schedule

    fabric = make_fabric()
    torch.manual_seed(cfg.seed)
    unet_t = teacher.unet.eval().requires_grad_(False).to(fabric.device)
    objective = _KDObjective(student.train(), unet_t, cfg)
    objective, opt = fabric.setup(objective, torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=1e-2))
    gen = torch.Generator().manual_seed(cfg.seed + fabric.global_rank)
    terms: dict[str, list[float]] = {}

    def step_fn(step: int) -> dict:
        idx = torch.randint(len(mean), (cfg.batch_size,), generator=gen)
        z0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.batch_size,), generator=gen)
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.cond_dropout
        cond = embeddings[torch.where(drop, torch.full_like(cap_idx[idx], empty), cap_idx[idx])]
        z_t, t, cond, noise = fabric.to_device((noise_sched.add_noise(z0, noise, t), t, cond, noise))
        loss, parts = objective(z_t, t, cond, noise)
        opt.zero_grad(set_to_none=True)
        fabric.backward(loss)
        fabric.clip_gradients(objective, opt, max_norm=1.0)
        opt.step()
        for k, v in parts.items():
            terms.setdefault(k, []).append(float(v.detach()))
        if on_log and fabric.is_global_zero and ((step + 1) % log_every == 0 or step + 1 == cfg.steps):
            on_log({k: sum(v[-log_every:]) / len(v[-log_every:]) for k, v in terms.items()}, step + 1)
        return {"loss": loss.item()}

    metrics = resumable_loop("kd", objective, opt, cfg.steps, checkpoint_dir, checkpoint_every, gen, step_fn, on_log,
                             log_every, dict(cfg=asdict(cfg), pruned=dict(student.config.get("pruned_layers", {}))),
                             fabric=fabric)
    objective.tap_s.remove()
    objective.tap_t.remove()
    metrics.update({f"kd_final_{k}": sum(v[-log_every:]) / len(v[-log_every:]) for k, v in terms.items()})
    return student.cpu().float().eval(), metrics


# ------------------------------------------------------------------------------------------------ tiny VAE


@dataclass(frozen=True)
class TinyVAEConfig:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    # Width of every encoder/decoder block (TAESD uses 64 for 512 px, against SD's 128-512). 16 for the tiny SD
    # teacher's 16/32/64: its decoder then costs 0.20x the teacher decoder's FLOPs (32: 0.78x, and 0.64x its time).
    channels: int = 16
    blocks: int = 1  # residual blocks per level
    degradation: float = 0.25  # decoder inputs are latents * (1 - u), u ~ U[0, degradation]
    adv_weight: float = 0.05
    adv_start: int = 0  # step at which the adversarial term switches on
    disc_lr: float = 2e-4
    seed: int = 0

    def check(self) -> "TinyVAEConfig":
        problems = [f"{n} must be >= 1, got {getattr(self, n)}" for n in ("steps", "batch_size", "channels", "blocks")
                    if int(getattr(self, n)) < 1]
        if not 0 < self.lr < 1 or not 0 < self.disc_lr < 1:
            problems.append(f"lr and disc_lr must be in (0, 1), got {self.lr} and {self.disc_lr}")
        if not 0 <= self.degradation < 1:
            problems.append(f"degradation must be in [0, 1), got {self.degradation}")
        if self.adv_weight < 0 or self.adv_start < 0:
            problems.append(f"adv_weight and adv_start must be >= 0, got {self.adv_weight} and {self.adv_start}")
        if problems:
            raise ValueError("invalid tiny-VAE config: " + "; ".join(problems))
        return self


def build_tiny_vae(teacher_vae, cfg: TinyVAEConfig):
    """An AutoencoderTiny with the teacher VAE's downsampling factor and latent channels."""
    from diffusers import AutoencoderTiny

    levels = len(teacher_vae.config.block_out_channels)
    ch = (cfg.channels,) * levels
    return AutoencoderTiny(in_channels=3, out_channels=3, encoder_block_out_channels=ch, decoder_block_out_channels=ch,
                           num_encoder_blocks=(1,) + (cfg.blocks,) * (levels - 1),
                           num_decoder_blocks=(cfg.blocks,) * (levels - 1) + (1,),
                           latent_channels=teacher_vae.config.latent_channels, scaling_factor=1.0,
                           force_upcast=False)


class PatchDiscriminator(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        sn = nn.utils.spectral_norm
        self.net = nn.Sequential(sn(nn.Conv2d(3, width, 4, 2, 1)), nn.LeakyReLU(0.2),
                                 sn(nn.Conv2d(width, 2 * width, 4, 2, 1)), nn.LeakyReLU(0.2),
                                 sn(nn.Conv2d(2 * width, 1, 3, 1, 1)))

    def forward(self, x):
        return self.net(x)


class _TinyVAEObjective(nn.Module):
    def __init__(self, vae, disc):
        super().__init__()
        self.vae, self.disc = vae, disc

    def forward(self, x, z, u):
        enc = self.vae.encoder(x)
        rec = self.vae.decoder(z * (1 - u))
        return enc, rec


def train_tiny_vae(teacher_dir: Path, dataset, out_dir: Path, cfg: TinyVAEConfig, *,
                   checkpoint_dir: Path | str | None = None, on_log: LogFn | None = None, log_every: int = 20,
                   checkpoint_every: int = 100) -> dict:
    from diffusers import AutoencoderKL

    cfg.check()
    teacher_vae = AutoencoderKL.from_pretrained(Path(teacher_dir) / "vae").eval()
    x_all = tiny_sd.to_tensor(dataset.images)
    z_all, _ = tiny_sd.encode_latents(teacher_vae, dataset.images)  # scaled posterior means: diffusion space

    fabric = make_fabric()
    torch.manual_seed(cfg.seed)
    vae, disc = build_tiny_vae(teacher_vae, cfg), PatchDiscriminator()
    objective = _TinyVAEObjective(vae, disc)
    opt_g = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.999))
    objective, opt_g, opt_d = fabric.setup(objective, opt_g, opt_d)
    gen = torch.Generator().manual_seed(cfg.seed + fabric.global_rank)
    terms: dict[str, list[float]] = {}

    def step_fn(step: int) -> dict:
        idx = torch.randint(len(x_all), (cfg.batch_size,), generator=gen)
        u = torch.rand(cfg.batch_size, 1, 1, 1, generator=gen) * cfg.degradation
        x, z, u = fabric.to_device((x_all[idx], z_all[idx], u))
        adv_on = step >= cfg.adv_start and cfg.adv_weight > 0
        enc, rec = objective(x, z, u)
        enc_l1 = F.l1_loss(enc, z)
        rec_l1 = F.l1_loss(rec, x)
        g_adv = -disc(rec).mean() if adv_on else torch.zeros((), device=x.device)
        loss = enc_l1 + rec_l1 + cfg.adv_weight * g_adv
        opt_g.zero_grad(set_to_none=True)
        fabric.backward(loss)
        opt_g.step()
        d_loss = torch.zeros(())
        if adv_on:  # hinge loss of the discriminator on real images vs (detached) reconstructions
            d_loss = F.relu(1 - disc(x)).mean() + F.relu(1 + disc(rec.detach())).mean()
            opt_d.zero_grad(set_to_none=True)
            fabric.backward(d_loss)
            opt_d.step()
        for k, v in {"loss_enc_l1": enc_l1, "loss_rec_l1": rec_l1, "loss_g_adv": g_adv, "loss_disc": d_loss}.items():
            terms.setdefault(k, []).append(float(v.detach()))
        if on_log and fabric.is_global_zero and ((step + 1) % log_every == 0 or step + 1 == cfg.steps):
            on_log({k: sum(v[-log_every:]) / len(v[-log_every:]) for k, v in terms.items()}, step + 1)
        return {"loss": loss.item()}

    metrics = resumable_loop("tiny_vae", objective, {"optimizer": opt_g, "disc": opt_d}, cfg.steps, checkpoint_dir,
                             checkpoint_every, gen, step_fn, on_log, log_every, dict(cfg=asdict(cfg)), fabric=fabric)
    metrics.update({f"tiny_vae_final_{k}": sum(v[-log_every:]) / len(v[-log_every:]) for k, v in terms.items()})
    vae = vae.cpu().float().eval()
    if fabric.is_global_zero:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        vae.save_pretrained(out_dir, safe_serialization=True)
        (Path(out_dir) / "tiny_vae_config.json").write_text(json.dumps(asdict(cfg)))
        share_readable(out_dir)
    fabric.barrier()
    return metrics
