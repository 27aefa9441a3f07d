"""Networks: an observation normalizer inside the policy (so the saved and exported policy takes raw observations),
the actor-critic of `rl.ppo` behind it, the student's optional auxiliary head, and the adversarial motion prior's
discriminator with its losses and style reward (equations in the package docstring)."""

from __future__ import annotations

import torch
from torch import nn

from distillery.rl.ppo import ActorCritic, _mlp


class Normalizer(nn.Module):
    """Running mean and variance of the observations (updated while collecting, frozen during an update)."""

    def __init__(self, dim: int, clip: float = 10.0):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        self.register_buffer("count", torch.tensor(1e-4))
        self.clip = clip

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        b_mean, b_var, b = x.mean(0), x.var(0, unbiased=False), x.shape[0]
        total = self.count + b
        delta = b_mean - self.mean
        self.mean += delta * b / total
        self.var.copy_((self.var * self.count + b_var * b + delta ** 2 * self.count * b / total) / total)
        self.count.copy_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / (self.var + 1e-8).sqrt()).clamp(-self.clip, self.clip)


class LocoPolicy(nn.Module):
    """Normalizer -> ActorCritic (the same PPO core as smdp-nav); with aux_dim > 0 a linear head on the actor's
    last hidden layer predicts the (standardized) privileged quantities, so its loss shapes the actor's features."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, init_log_std: float = -0.5, aux_dim: int = 0):
        super().__init__()
        self.obs_dim, self.act_dim, self.hidden, self.aux_dim = obs_dim, act_dim, hidden, aux_dim
        self.norm = Normalizer(obs_dim)
        self.ac = ActorCritic(obs_dim, act_dim, hidden, init_log_std)
        self.aux = nn.Linear(hidden, aux_dim) if aux_dim else None

    def forward(self, obs: torch.Tensor, action: torch.Tensor | None = None, generator: torch.Generator | None = None):
        return self.ac(self.norm(obs), action, generator)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.ac.value(self.norm(obs))

    def features(self, obs: torch.Tensor) -> torch.Tensor:
        return self.ac.actor[:4](self.norm(obs))  # after the second Tanh

    def predict_aux(self, obs: torch.Tensor) -> torch.Tensor:
        if self.aux is None:
            raise ValueError("this policy has no auxiliary head")
        return self.aux(self.features(obs))

    def mean_action(self, obs: torch.Tensor) -> torch.Tensor:
        return self.ac.actor(self.norm(obs))

    @torch.no_grad()
    def act_deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        return self.mean_action(obs).clamp(-1, 1)


class Discriminator(nn.Module):
    """D(s, s') on proprioceptive transitions only: its input is two proprio vectors, nothing else."""

    def __init__(self, proprio_dim: int, hidden: int):
        super().__init__()
        self.proprio_dim = proprio_dim
        self.norm = Normalizer(proprio_dim)
        self.net = _mlp(2 * proprio_dim, hidden, 1, gain=1.0)
        for layer in self.net:  # ReLU-free tanh MLP from the PPO core, unit-scale output
            if isinstance(layer, nn.Linear):
                nn.init.orthogonal_(layer.weight, 1.0)

    def forward(self, s: torch.Tensor, s_next: torch.Tensor) -> torch.Tensor:
        if s.shape[-1] != self.proprio_dim or s_next.shape[-1] != self.proprio_dim:
            raise ValueError(f"the discriminator takes proprioceptive transitions of {self.proprio_dim} features, got "
                             f"{s.shape[-1]} and {s_next.shape[-1]}")
        return self.net(torch.cat([self.norm(s), self.norm(s_next)], -1)).squeeze(-1)


def style_reward(d: torch.Tensor) -> torch.Tensor:
    """r_s = max(0, 1 - 1/4 (D - 1)^2): 1 where D calls the transition the teacher's (D = 1), 0 at D <= -1."""
    return (1 - 0.25 * (d - 1) ** 2).clamp(min=0.0)


def discriminator_loss(disc: Discriminator, teacher: tuple[torch.Tensor, torch.Tensor],
                       student: tuple[torch.Tensor, torch.Tensor], gp_weight: float) -> tuple[torch.Tensor, dict]:
    """Least squares: E_T[(D - 1)^2] + E_S[(D + 1)^2] + gp_weight E_T[|grad_(s,s') D|^2]; accuracy counts teacher
    transitions with D > 0 and student ones with D < 0."""
    s, s_next = (x.detach().requires_grad_(True) for x in teacher)
    d_teacher = disc(s, s_next)
    d_student = disc(*student)
    ls = ((d_teacher - 1) ** 2).mean() + ((d_student + 1) ** 2).mean()
    grads = torch.autograd.grad(d_teacher.sum(), (s, s_next), create_graph=True)
    gp = sum((g ** 2).sum(-1) for g in grads).mean()
    with torch.no_grad():
        acc = 0.5 * ((d_teacher > 0).float().mean() + (d_student < 0).float().mean())
    return ls + gp_weight * gp, {"disc_ls_loss": ls.item(), "disc_grad_penalty": gp.item(), "disc_accuracy": float(acc),
                                 "disc_teacher_mean": float(d_teacher.mean()),
                                 "disc_student_mean": float(d_student.mean())}
