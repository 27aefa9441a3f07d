"""MoDE: a diffusion-transformer policy whose feed-forward layers are a mixture of denoising experts.

The policy denoises an action chunk (H x act_dim) conditioned on the observation history and the instruction
embedding, with EDM preconditioning (Karras et al. 2022): D(a; sigma) = c_skip a + c_out F(c_in a, c_noise).
The token sequence is [noise, instruction, observations..., actions...]: the noise token lets self-attention
see the noise level. Each feed-forward layer is a mixture of experts whose router reads only the noise
embedding, never the tokens, so every token of a sample at one noise level uses the same top-k experts; a
load-balancing loss keeps the experts in use. The dense baseline is the same transformer with one FFN of the
same active size (top_k x expert_hidden).

Because routing depends on the noise level alone, a fixed sampling schedule fixes which experts run at each
step: `ExpertCache` precomputes them and fuses each layer's top-k experts (weighted) into a single FFN per
step, and also precomputes the noise embeddings. Sampling with the cache skips the routers and the per-expert
dispatch and gives the same actions. It also makes the sampler a static graph (no data-dependent dispatch left),
so `freeze_sampler` can trace the whole denoising loop into one frozen TorchScript graph: that is what serves.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class MoDEConfig:
    obs_dim: int = 39
    act_dim: int = 4
    obs_history: int = 2
    chunk: int = 8  # actions predicted per denoising (the action chunk)
    text_dim: int = 384  # MiniLM sentence embedding
    width: int = 128
    depth: int = 4
    heads: int = 4
    num_experts: int = 4
    top_k: int = 2
    expert_hidden: int = 256
    dense: bool = False  # the baseline: one FFN of hidden size top_k * expert_hidden
    sigma_data: float = 0.5

    def check(self) -> "MoDEConfig":
        problems = [f"{k} must be >= 1, got {getattr(self, k)}" for k in
                    ("obs_dim", "act_dim", "obs_history", "chunk", "width", "depth", "heads", "num_experts",
                     "top_k", "expert_hidden") if int(getattr(self, k)) < 1]
        if self.top_k > self.num_experts:
            problems.append(f"top_k ({self.top_k}) cannot exceed num_experts ({self.num_experts})")
        if self.width % self.heads:
            problems.append(f"width ({self.width}) must be divisible by heads ({self.heads})")
        if problems:
            raise ValueError("invalid MoDE config: " + "; ".join(problems))
        return self


class DenseFFN(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor, noise_emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class NoiseRoutedMoE(nn.Module):
    """Top-k mixture of GELU experts; the router sees the noise embedding only (one routing per sample)."""

    def __init__(self, width: int, hidden: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(width, num_experts)
        scale1, scale2 = 1 / math.sqrt(width), 1 / math.sqrt(hidden)
        self.w1 = nn.Parameter(torch.empty(num_experts, width, hidden).uniform_(-scale1, scale1))
        self.b1 = nn.Parameter(torch.zeros(num_experts, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, width).uniform_(-scale2, scale2))
        self.b2 = nn.Parameter(torch.zeros(num_experts, width))
        self.aux_loss = torch.zeros(())

    def route(self, noise_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weights (B, k) summing to 1, expert indices (B, k), router probabilities (B, E))."""
        probs = self.router(noise_emb).softmax(-1)
        top, idx = probs.topk(self.top_k, dim=-1)
        return top / top.sum(-1, keepdim=True), idx, probs

    def forward(self, x: torch.Tensor, noise_emb: torch.Tensor) -> torch.Tensor:
        weights, idx, probs = self.route(noise_emb)
        out = torch.zeros_like(x)
        for e in range(self.w1.shape[0]):  # each expert runs once, on the samples routed to it
            rows, slot = (idx == e).nonzero(as_tuple=True)
            if len(rows):
                h = F.gelu(x[rows] @ self.w1[e] + self.b1[e])
                out = out.index_add(0, rows, weights[rows, slot, None, None] * (h @ self.w2[e] + self.b2[e]))
        # Switch-Transformer load balancing: E * sum_e (share of routings to e) * (mean probability of e)
        share = F.one_hot(idx, probs.shape[-1]).float().mean((0, 1))
        self.aux_loss = probs.shape[-1] * (share * probs.mean(0)).sum()
        return out

    @torch.no_grad()
    def fuse(self, noise_emb: torch.Tensor) -> DenseFFN:
        """One FFN equal to this layer at one noise level: the chosen experts side by side, weights folded in."""
        weights, idx, _ = self.route(noise_emb.reshape(1, -1))
        experts, w = idx[0].tolist(), weights[0]
        fused = DenseFFN(self.w1.shape[1], self.w1.shape[2] * len(experts))
        fused.fc1.weight.copy_(torch.cat([self.w1[e].T for e in experts]))
        fused.fc1.bias.copy_(torch.cat([self.b1[e] for e in experts]))
        fused.fc2.weight.copy_(torch.cat([w[j] * self.w2[e].T for j, e in enumerate(experts)], dim=1))
        fused.fc2.bias.copy_(sum(w[j] * self.b2[e] for j, e in enumerate(experts)))
        return fused.eval()


class Block(nn.Module):
    def __init__(self, cfg: MoDEConfig):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(cfg.width), nn.LayerNorm(cfg.width)
        self.attn = nn.MultiheadAttention(cfg.width, cfg.heads, batch_first=True)
        self.ffn = (DenseFFN(cfg.width, cfg.top_k * cfg.expert_hidden) if cfg.dense
                    else NoiseRoutedMoE(cfg.width, cfg.expert_hidden, cfg.num_experts, cfg.top_k))

    def forward(self, x: torch.Tensor, noise_emb: torch.Tensor, ffn: nn.Module | None = None) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + (ffn or self.ffn)(self.norm2(x), noise_emb)


class MoDEPolicy(nn.Module):
    def __init__(self, cfg: MoDEConfig):
        super().__init__()
        self.cfg = cfg.check()
        w = cfg.width
        self.obs_in, self.goal_in, self.act_in = nn.Linear(cfg.obs_dim, w), nn.Linear(cfg.text_dim, w), nn.Linear(cfg.act_dim, w)
        self.noise_mlp = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.pos = nn.Parameter(torch.randn(1, 2 + cfg.obs_history + cfg.chunk, w) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(w)
        self.act_out = nn.Linear(w, cfg.act_dim)

    def noise_embedding(self, sigma: torch.Tensor) -> torch.Tensor:
        """EDM's c_noise = log(sigma) / 4, sinusoidal features, an MLP: (B,) -> (B, width)."""
        half = self.cfg.width // 2
        freqs = torch.exp(-math.log(10_000) * torch.arange(half, dtype=torch.float32) / half)
        angles = (sigma.float().log() / 4)[:, None] * freqs[None] * 1000
        return self.noise_mlp(torch.cat([angles.sin(), angles.cos()], -1))

    def network(self, a_in: torch.Tensor, noise_emb: torch.Tensor, obs: torch.Tensor, goal: torch.Tensor,
                ffns: list[nn.Module] | None = None) -> torch.Tensor:
        x = torch.cat([noise_emb[:, None], self.goal_in(goal)[:, None], self.obs_in(obs), self.act_in(a_in)], 1)
        x = x + self.pos
        for i, block in enumerate(self.blocks):
            x = block(x, noise_emb, ffns[i] if ffns is not None else None)
        return self.act_out(self.norm(x[:, -self.cfg.chunk:]))

    def denoise(self, a: torch.Tensor, sigma: torch.Tensor, obs: torch.Tensor, goal: torch.Tensor,
                noise_emb: torch.Tensor | None = None, ffns: list[nn.Module] | None = None) -> torch.Tensor:
        """EDM-preconditioned denoiser D(a; sigma); `noise_emb`/`ffns` come from an ExpertCache when given."""
        sd = self.cfg.sigma_data
        s = sigma.view(-1, 1, 1)
        c_skip, c_out = sd ** 2 / (s ** 2 + sd ** 2), s * sd / (s ** 2 + sd ** 2).sqrt()
        c_in = 1 / (s ** 2 + sd ** 2).sqrt()
        if noise_emb is None:
            noise_emb = self.noise_embedding(sigma)
        return c_skip * a + c_out * self.network(c_in * a, noise_emb, obs, goal, ffns)

    def aux_loss(self) -> torch.Tensor:
        losses = [b.ffn.aux_loss for b in self.blocks if isinstance(b.ffn, NoiseRoutedMoE)]
        return torch.stack(losses).mean() if losses else torch.zeros(())

    def active_parameters(self) -> int:
        """Parameters used for one denoising step: the routers and the top-k experts, not all experts."""
        total = sum(p.numel() for p in self.parameters())
        for b in self.blocks:
            if isinstance(b.ffn, NoiseRoutedMoE):
                per_expert = sum(p[0].numel() for p in (b.ffn.w1, b.ffn.b1, b.ffn.w2, b.ffn.b2))
                total -= per_expert * (b.ffn.w1.shape[0] - b.ffn.top_k)
        return total


def edm_loss(policy: MoDEPolicy, actions: torch.Tensor, obs: torch.Tensor, goal: torch.Tensor, *,
             generator: torch.Generator | None = None, p_mean: float = -1.2, p_std: float = 1.2,
             aux_weight: float = 0.01) -> tuple[torch.Tensor, dict]:
    """EDM denoising loss with log-normal noise levels, plus the routers' load-balancing loss."""
    sd = policy.cfg.sigma_data
    # Drawn on the generator's device (CPU) and then moved, so a run samples the same noise on any accelerator.
    sigma = (torch.randn(actions.shape[0], generator=generator) * p_std + p_mean).exp().to(actions.device)
    noisy = actions + sigma.view(-1, 1, 1) * torch.randn(actions.shape, generator=generator).to(actions.device)
    weight = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
    denoise = ((policy.denoise(noisy, sigma, obs, goal) - actions) ** 2).mean((1, 2))
    mse = (weight * denoise).mean()
    aux = policy.aux_loss()
    return mse + aux_weight * aux, {"denoise_loss": mse.item(), "balance_loss": aux.item()}


def karras_sigmas(steps: int, sigma_min: float = 0.001, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ramp = torch.linspace(0, 1, steps)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


class ExpertCache:
    """Per denoising step of a fixed schedule: the noise embedding and each layer's fused expert FFN."""

    def __init__(self, policy: MoDEPolicy, sigmas: torch.Tensor):
        if policy.cfg.dense:
            raise ValueError("the dense baseline has no experts to cache")
        self.sigmas = sigmas.clone()
        with torch.no_grad():
            self.noise = [policy.noise_embedding(s.view(1)) for s in sigmas]
            self.ffns = [[b.ffn.fuse(n) for b in policy.blocks] for n in self.noise]

    def experts(self, policy: MoDEPolicy) -> list[list[list[int]]]:
        """Which experts each layer uses at each step (for reports)."""
        with torch.no_grad():
            return [[b.ffn.route(n)[1][0].tolist() for b in policy.blocks] for n in self.noise]


@torch.no_grad()
def sample(policy: MoDEPolicy, obs: torch.Tensor, goal: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor,
           cache: ExpertCache | None = None) -> torch.Tensor:
    """Deterministic DDIM (the Euler step of the probability-flow ODE in sigma) from sigmas[0] down to 0.
    `noise`: standard normal (B, chunk, act_dim). With `cache` the routers and expert dispatch are skipped."""
    if cache is not None and not torch.equal(cache.sigmas, sigmas):
        raise ValueError("the expert cache was built for another sampling schedule; build it for these sigmas")
    a = noise * sigmas[0]
    b = a.shape[0]
    for i, sigma in enumerate(sigmas):
        s = sigma.expand(b)
        if cache is None:
            denoised = policy.denoise(a, s, obs, goal)
        else:
            denoised = policy.denoise(a, s, obs, goal, noise_emb=cache.noise[i].expand(b, -1), ffns=cache.ffns[i])
        nxt = sigmas[i + 1] if i + 1 < len(sigmas) else torch.zeros(())
        a = denoised + (nxt / sigma) * (a - denoised)  # DDIM: keep the direction, shrink the noise to the next level
    return a


class _Sampler(nn.Module):
    """The sampling loop as a module, so tracing sees the fused expert weights as parameters."""

    def __init__(self, policy: MoDEPolicy, sigmas: torch.Tensor, cache: ExpertCache | None):
        super().__init__()
        self.policy, self.sigmas, self.cache = policy, sigmas, cache
        self.fused = nn.ModuleList(nn.ModuleList(step) for step in (cache.ffns if cache else []))

    def forward(self, obs: torch.Tensor, goal: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return sample(self.policy, obs, goal, noise, self.sigmas, self.cache)


@torch.no_grad()
def freeze_sampler(policy: MoDEPolicy, sigmas: torch.Tensor, cache: ExpertCache | None = None):
    """The whole sampler (every denoising step of `sigmas`) traced and frozen into one TorchScript graph:
    (obs, goal, noise) -> actions, any batch size. Only valid where no step depends on the data: the dense
    baseline, or MoDE with its expert cache. Uncached MoDE picks its experts at run time, and a trace would
    silently bake in the experts of the example input."""
    if cache is None and not policy.cfg.dense:
        raise ValueError("uncached MoDE routes at run time and cannot be frozen; build an ExpertCache first")
    cfg = policy.cfg  # a cache built for another schedule is refused by `sample` while tracing
    example = (torch.zeros(1, cfg.obs_history, cfg.obs_dim), torch.zeros(1, cfg.text_dim),
               torch.zeros(1, cfg.chunk, cfg.act_dim))
    module = _Sampler(policy.eval(), sigmas, cache).eval()
    with warnings.catch_warnings():
        # The tracer warns that the loop over the schedule is unrolled: fixing the schedule is the point. TorchScript
        # is deprecated in favour of torch.compile, which needs a C++ toolchain in the serving image; until torch
        # drops it, a frozen trace is the CPU-only way to serve a static graph (about 2x faster than eager here).
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated", category=DeprecationWarning)
        traced = torch.jit.trace(module, example, check_trace=False)
        # Not optimize_for_inference: its oneDNN kernels gain little at this size and stall badly on a shared CPU.
        return torch.jit.freeze(traced)
