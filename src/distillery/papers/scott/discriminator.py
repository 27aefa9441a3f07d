"""SCott's adversaries, each a module with the same call `disc(z, text, t) -> logits`, and the losses they train on.

- ``teacher`` (the paper's, in the style of latent adversarial distillation): the frozen teacher UNet is the
  feature extractor. A latent is re-noised to a sampled timestep and run through the teacher with the caption;
  forward hooks take the activations of every down block and the mid block, and a small trainable head per
  level (conv, pooled, projection-conditioned on the pooled text embedding and the timestep) gives one logit
  per level. Only the heads train: the teacher is held outside the module's parameters and state dict.
- ``latent`` (ablation): a small standalone conv net on clean latents, conditioned the same way.

Both train with the hinge loss; the generator (the student) gets -D.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DISCRIMINATORS = ("teacher", "latent")


def _timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    from diffusers.models.embeddings import get_timestep_embedding

    return get_timestep_embedding(t, dim)


def _pooled(text: torch.Tensor) -> torch.Tensor:
    return text.mean(1) if text.dim() == 3 else text


class _ProjectionHead(nn.Module):
    """Features (B, C, H, W) -> one logit per sample: a linear term plus the projection onto the condition."""

    def __init__(self, channels: int, width: int, cond_dim: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.GroupNorm(min(8, width), width),
                                  nn.SiLU(), nn.Conv2d(width, width, 3, padding=1), nn.SiLU())
        self.out = nn.Linear(width, 1)
        self.project = nn.Linear(cond_dim, width)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.body(h).mean((2, 3))
        return self.out(h).squeeze(1) + (h * self.project(c)).sum(1)


class _Stop(Exception):
    """Raised by the mid-block hook: the teacher's up path is never needed for the features."""


class TeacherFeatureDiscriminator(nn.Module):
    """Trainable heads on the frozen teacher UNet's down- and mid-block features. `forward(z_t, text, t)` takes
    latents already noised to `t` (see `renoise`) and returns logits (B, levels)."""

    renoises = True

    def __init__(self, teacher_unet, text_dim: int, width: int = 64, t_dim: int = 64):
        super().__init__()
        teacher_unet.eval().requires_grad_(False)
        # A tuple, not an attribute: the teacher's weights stay out of parameters(), state_dict() and checkpoints.
        self._teacher = (teacher_unet,)
        self.t_dim = t_dim
        channels = list(teacher_unet.config.block_out_channels)
        self.levels = [f"down_blocks.{i}" for i in range(len(teacher_unet.down_blocks))] + ["mid_block"]
        level_channels = channels + [channels[-1]]
        self.cond = nn.Sequential(nn.Linear(text_dim + t_dim, 2 * width), nn.SiLU(), nn.Linear(2 * width, 2 * width))
        self.heads = nn.ModuleList(_ProjectionHead(c, width, 2 * width) for c in level_channels)

    @property
    def teacher(self):
        return self._teacher[0]

    def features(self, z_t: torch.Tensor, text: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
        """The teacher's activations after each down block and the mid block, for (z_t, t) and the caption."""
        feats: list[torch.Tensor] = []

        def keep(_m, _a, out):
            feats.append(out[0] if isinstance(out, tuple) else out)

        def keep_and_stop(m, a, out):
            keep(m, a, out)
            raise _Stop

        unet = self.teacher
        hooks = [b.register_forward_hook(keep) for b in unet.down_blocks]
        hooks.append(unet.mid_block.register_forward_hook(keep_and_stop))
        try:
            unet(z_t, t, encoder_hidden_states=text)
        except _Stop:
            pass
        finally:
            for h in hooks:
                h.remove()
        if len(feats) != len(self.heads):
            raise RuntimeError(f"expected {len(self.heads)} feature maps from the teacher, got {len(feats)}")
        return feats

    def logits(self, feats: list[torch.Tensor], text: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c = self.cond(torch.cat([_pooled(text), _timestep_embedding(t, self.t_dim).to(text)], 1))
        return torch.stack([head(f.to(c.dtype), c) for head, f in zip(self.heads, feats)], 1)

    def forward(self, z_t: torch.Tensor, text: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.logits(self.features(z_t, text, t), text, t)


class LatentDiscriminator(nn.Module):
    """Projection discriminator on clean latents, conditioned on the (mean-pooled) text embedding and the timestep."""

    renoises = False

    def __init__(self, latent_channels: int = 4, text_dim: int = 384, width: int = 64, t_dim: int = 64):
        super().__init__()
        self.t_dim = t_dim
        self.body = nn.Sequential(
            nn.Conv2d(latent_channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.GroupNorm(8, 2 * width), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.SiLU())
        self.cond = nn.Sequential(nn.Linear(text_dim + t_dim, 2 * width), nn.SiLU(), nn.Linear(2 * width, 2 * width))
        self.out = nn.Linear(2 * width, 1)

    def forward(self, z: torch.Tensor, text: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.body(z).mean((2, 3))
        c = self.cond(torch.cat([_pooled(text), _timestep_embedding(t, self.t_dim).to(text)], 1))
        return self.out(h).squeeze(1) + (h * c).sum(1)


def make_discriminator(kind: str, teacher_unet, text_dim: int) -> nn.Module:
    if kind == "teacher":
        return TeacherFeatureDiscriminator(teacher_unet, text_dim)
    if kind == "latent":
        return LatentDiscriminator(teacher_unet.config.in_channels, text_dim)
    raise ValueError(f"discriminator must be one of {DISCRIMINATORS}, got {kind!r}")


def renoise(z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The forward process q(z_t | z_0) at per-sample timesteps `t`."""
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    return a.sqrt() * z0 + (1 - a).sqrt() * noise


def discriminator_hinge_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()


def adversarial_losses(disc: nn.Module, fake: torch.Tensor, real: torch.Tensor, text: torch.Tensor, t: torch.Tensor,
                       noise: torch.Tensor | None = None,
                       alphas_cumprod: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(generator loss, discriminator loss, diagnostics) for clean latents `fake` (the student's estimate, with
    its graph) and `real`. A re-noising discriminator sees both noised to `t` with the same `noise`. The generator
    loss reaches the student through the (frozen) teacher; the discriminator loss sees `fake` detached, and the
    teacher's features of the real and fake batch are computed without a graph (only the heads learn from it)."""
    if getattr(disc, "renoises", False):
        if noise is None or alphas_cumprod is None:
            raise ValueError("a re-noising discriminator needs the noise and the alphas_cumprod to noise with")
        fake, real = renoise(fake, t, noise, alphas_cumprod), renoise(real, t, noise, alphas_cumprod)
    g_loss = generator_adversarial_loss(disc(fake, text, t))
    both, text2, t2 = torch.cat([real, fake.detach()]), torch.cat([text, text]), torch.cat([t, t])
    if isinstance(disc, TeacherFeatureDiscriminator):
        with torch.no_grad():
            feats = disc.features(both, text2, t2)
        logits = disc.logits(feats, text2, t2)
    else:
        logits = disc(both, text2, t2)
    real_logits, fake_logits = logits.chunk(2)
    d_loss = discriminator_hinge_loss(real_logits, fake_logits)
    with torch.no_grad():
        accuracy = ((real_logits > 0).float().mean() + (fake_logits < 0).float().mean()) / 2
    return g_loss, d_loss, {"disc_loss": float(d_loss.detach()), "disc_accuracy": float(accuracy),
                            "adv_loss": float(g_loss.detach())}
