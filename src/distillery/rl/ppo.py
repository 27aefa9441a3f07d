"""A compact PPO core in CleanRL's layout: one hyperparameter dataclass, GAE as a plain reverse loop with an
explicit bootstrap and a per-step discount, a clipped-surrogate update readable top to bottom, and the usual
diagnostics (approx KL, clip fraction, explained variance).

Distributed PPO (DPPO) is the same code under Lightning Fabric's DDP: every rank steps its own environments,
computes the loss on its own rollout and DDP all-reduces (averages) the gradients, so every rank applies the same
update. Each rank must make the same number of backward passes per update, so minibatches are counted, not sized.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class PPOConfig:
    lr: float = 3e-4  # Adam learning rate
    num_envs: int = 16  # environments per rank
    epochs: int = 4  # passes over each rollout
    minibatches: int = 4  # minibatches per epoch (the same count on every rank, whatever the rollout size)
    clip: float = 0.2  # PPO ratio clip
    vf_coef: float = 0.5  # value loss weight
    ent_coef: float = 0.0  # entropy bonus weight
    max_grad_norm: float = 0.5  # global gradient clip
    lam: float = 0.95  # GAE lambda (per decision)
    hidden: int = 128  # width of the actor and critic MLPs
    init_log_std: float = -0.5  # initial log std of the Gaussian policy

    def check(self) -> "PPOConfig":
        problems = [f"{k} must be > 0, got {getattr(self, k)}" for k in ("lr", "num_envs", "epochs", "minibatches",
                                                                          "clip", "max_grad_norm", "hidden")
                    if not getattr(self, k) > 0]
        if not 0.0 <= self.lam <= 1.0:
            problems.append(f"lam must be in [0, 1], got {self.lam}")
        if self.vf_coef < 0 or self.ent_coef < 0:
            problems.append("vf_coef and ent_coef must be >= 0")
        if problems:
            raise ValueError("invalid PPOConfig: " + "; ".join(problems))
        return self

    def as_dict(self) -> dict:
        return asdict(self)


def _mlp(inp: int, hidden: int, out: int, gain: float) -> nn.Sequential:
    layers = [nn.Linear(inp, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, out)]
    for layer in layers:
        if isinstance(layer, nn.Linear):
            nn.init.orthogonal_(layer.weight, np.sqrt(2))
            nn.init.zeros_(layer.bias)
    nn.init.orthogonal_(layers[-1].weight, gain)
    return nn.Sequential(*layers)


class ActorCritic(nn.Module):
    """Gaussian policy (state-independent log std) and value function, separate MLPs. Actions live in [-1, 1]^d;
    samples outside are clipped by the environment, the log-probability is the unclipped sample's (CleanRL)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 128, init_log_std: float = -0.5):
        super().__init__()
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.actor = _mlp(obs_dim, hidden, act_dim, gain=0.01)
        self.critic = _mlp(obs_dim, hidden, 1, gain=1.0)
        self.log_std = nn.Parameter(torch.full((act_dim,), float(init_log_std)))

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(obs).squeeze(-1)

    def dist(self, obs: torch.Tensor) -> torch.distributions.Normal:
        return torch.distributions.Normal(self.actor(obs), self.log_std.exp().expand(obs.shape[0], -1))

    def forward(self, obs: torch.Tensor, action: torch.Tensor | None = None, generator: torch.Generator | None = None):
        """(action, log_prob, entropy, value); samples an action when none is given."""
        d = self.dist(obs)
        if action is None:
            action = d.mean + d.stddev * torch.randn(d.mean.shape, generator=generator)
        return action, d.log_prob(action).sum(-1), d.entropy().sum(-1), self.value(obs)

    @torch.no_grad()
    def act_deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        return self.actor(obs).clamp(-1, 1)


def gae(rewards: np.ndarray, values: np.ndarray, next_values: np.ndarray, dones: np.ndarray,
        discounts: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Generalized advantage estimation with a discount per step, arrays shaped (T, N) (time, environment):

        delta_t = r_t + discounts_t (1 - d_t) V(s_{t+1}) - V(s_t)
        A_t     = delta_t + discounts_t lam (1 - d_t) A_{t+1}

    `next_values[t]` is V(s_{t+1}) of the state reached by step t (its bootstrap; ignored where d_t = 1).
    Ordinary GAE is `discounts` = gamma everywhere. Returns (advantages, returns = advantages + values)."""
    rewards, values, next_values, dones, discounts = (np.asarray(a, np.float64) for a in
                                                      (rewards, values, next_values, dones, discounts))
    if not rewards.shape == values.shape == next_values.shape == dones.shape == discounts.shape:
        raise ValueError(f"gae needs equal shapes, got {[a.shape for a in (rewards, values, next_values, dones, discounts)]}")
    adv = np.zeros_like(rewards)
    last = np.zeros(rewards.shape[1:])
    for t in reversed(range(len(rewards))):
        live = 1.0 - dones[t]
        delta = rewards[t] + discounts[t] * live * next_values[t] - values[t]
        last = delta + discounts[t] * lam * live * last
        adv[t] = last
    return adv, adv + values


def ppo_update(fabric, model, opt, cfg: PPOConfig, batch: dict[str, torch.Tensor], generator: torch.Generator,
               extra_loss: Callable[[dict], tuple[torch.Tensor, dict]] | None = None) -> dict:
    """`cfg.epochs` x `cfg.minibatches` clipped-surrogate steps on this rank's rollout (flat tensors obs, actions,
    logprobs, advantages, returns, values). Under DDP every rank makes the same number of steps and the gradients
    are averaged in `fabric.backward`.

    `extra_loss(minibatch)` -> (loss, {name: value}) adds a term stepped with PPO's (an auxiliary head; the batch may
    carry the extra tensors it needs); its named values are averaged into the returned stats."""
    n = len(batch["obs"])
    if n < cfg.minibatches:
        raise ValueError(f"a rollout of {n} decisions cannot be split into {cfg.minibatches} minibatches")
    stats: dict[str, list[float]] = {k: [] for k in ("loss", "policy_loss", "value_loss", "entropy", "approx_kl",
                                                   "clip_fraction")}
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=generator)
        for idx in torch.tensor_split(perm, cfg.minibatches):
            mb = {k: v[idx] for k, v in batch.items()}
            _, logp, ent, value = model(mb["obs"], mb["actions"])
            ratio = (logp - mb["logprobs"]).exp()
            adv = mb["advantages"]
            adv = (adv - adv.mean()) / (adv.std(unbiased=False) + 1e-8)
            pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - cfg.clip, 1 + cfg.clip)).mean()
            vf = 0.5 * ((value - mb["returns"]) ** 2).mean()
            loss = pg + cfg.vf_coef * vf - cfg.ent_coef * ent.mean()
            if extra_loss is not None:
                extra, extra_stats = extra_loss(mb)
                loss = loss + extra
                for k, v in extra_stats.items():
                    stats.setdefault(k, []).append(float(v))
            opt.zero_grad(set_to_none=True)
            fabric.backward(loss)
            fabric.clip_gradients(model, opt, max_norm=cfg.max_grad_norm)
            opt.step()
            with torch.no_grad():
                log_ratio = logp - mb["logprobs"]
                stats["approx_kl"].append(float(((ratio - 1) - log_ratio).mean()))
                stats["clip_fraction"].append(float(((ratio - 1).abs() > cfg.clip).float().mean()))
            for k, v in (("loss", loss), ("policy_loss", pg), ("value_loss", vf), ("entropy", ent.mean())):
                stats[k].append(v.item())
    y, v = batch["returns"].cpu().numpy(), batch["values"].cpu().numpy()
    explained = float(1 - np.var(y - v) / np.var(y)) if np.var(y) > 0 else float("nan")
    return {**{k: float(np.mean(s)) for k, s in stats.items()}, "explained_variance": explained}
