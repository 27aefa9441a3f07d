"""Training MoDE (or the dense baseline) on demonstrations, and the saved policy that acts: observation history +
task -> action chunk, with or without the expert cache.

A saved policy is a folder: `model.safetensors` (weights), `policy.json` (network config, sampling steps,
observation normalization, task names and their instruction embeddings). Nothing is unpickled on load.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from distillery.models.files import seal
from distillery.models.training import LogFn, make_fabric, resumable_loop
from distillery.papers.mode.model import (ExpertCache, MoDEConfig, MoDEPolicy, edm_loss, freeze_sampler, karras_sigmas,
                                          sample)


def windows(demos, obs_history: int, chunk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every step of every episode as (observation history, action chunk, task): the history repeats the first
    observation before the episode starts, the chunk repeats the last action after it ends."""
    obs_w, act_w, task_w = [], [], []
    for i in range(len(demos.start)):
        o, a = demos.episode(i)
        n = len(o)
        hist = np.clip(np.arange(n)[:, None] + np.arange(-obs_history + 1, 1)[None], 0, n - 1)
        fut = np.clip(np.arange(n)[:, None] + np.arange(chunk)[None], 0, n - 1)
        obs_w.append(o[hist])
        act_w.append(a[fut])
        task_w.append(np.full(n, int(demos.task[i])))
    return np.concatenate(obs_w), np.concatenate(act_w), np.concatenate(task_w)


def train_policy(demos, out_dir: Path, cfg: MoDEConfig, *, steps: int, batch_size: int = 256, lr: float = 3e-4,
                 aux_weight: float = 0.01, sampling_steps: int = 10, seed: int = 0,
                 checkpoint_dir: Path | None = None, checkpoint_every: int = 500, on_log: LogFn | None = None,
                 log_every: int = 50) -> dict:
    from distillery.models.text_encoder import sentence_embeddings

    cfg = cfg.check()
    if steps < 1 or batch_size < 1 or not lr > 0 or sampling_steps < 1:
        raise ValueError(f"steps, batch_size, sampling_steps must be >= 1 and lr > 0; got {steps}, {batch_size}, "
                         f"{sampling_steps}, {lr}")
    obs, act, task = windows(demos, cfg.obs_history, cfg.chunk)
    mean, std = obs.reshape(-1, obs.shape[-1]).mean(0), obs.reshape(-1, obs.shape[-1]).std(0) + 1e-3
    goals = sentence_embeddings(demos.instructions).float()
    obs_t = torch.from_numpy((obs - mean) / std).float()
    act_t, task_t = torch.from_numpy(act).float(), torch.from_numpy(task).long()

    # Plain DDP for both: top-k routing idles experts, but they share one stacked parameter per layer with the
    # experts in use, so every parameter has a gradient each step (see make_fabric).
    fabric = make_fabric()
    torch.manual_seed(seed)
    policy = MoDEPolicy(cfg)
    model, opt = fabric.setup(policy, torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=1e-4))
    model.mark_forward_method("denoise")
    gen = torch.Generator().manual_seed(seed + fabric.global_rank)  # each rank its own batches and noise
    extra = {}

    def step_fn(_: int) -> dict:
        idx = torch.randint(len(obs_t), (batch_size,), generator=gen)
        batch = fabric.to_device((act_t[idx], obs_t[idx], goals[task_t[idx]]))
        loss, logs = edm_loss(model, *batch, generator=gen, aux_weight=aux_weight)
        opt.zero_grad(set_to_none=True)
        fabric.backward(loss)
        fabric.clip_gradients(model, opt, max_norm=1.0)
        opt.step()
        extra.update(logs)
        return {"loss": loss.item()}

    name = "dense" if cfg.dense else "mode"
    metrics = resumable_loop(name, model, opt, steps, checkpoint_dir, checkpoint_every, gen, step_fn, on_log,
                             log_every, dict(cfg=asdict(cfg), steps=steps, batch_size=batch_size, lr=lr,
                                             aux_weight=aux_weight, seed=seed, data=demos.manifest.get("content_sha256")),
                             fabric=fabric)
    policy = policy.cpu().float()
    if fabric.is_global_zero:
        save_policy(Path(out_dir), policy, sampling_steps=sampling_steps, obs_mean=mean, obs_std=std,
                    tasks=list(demos.tasks), instructions=list(demos.instructions), goals=goals)
    fabric.barrier()
    return {**metrics, **{f"{name}_{k}": v for k, v in extra.items()},
            f"{name}_total_parameters": float(sum(p.numel() for p in policy.parameters())),
            f"{name}_active_parameters": float(policy.active_parameters())}


def save_policy(out: Path, policy: MoDEPolicy, *, sampling_steps: int, obs_mean, obs_std, tasks, instructions,
                goals: torch.Tensor) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in policy.state_dict().items()}, out / "model.safetensors")
    (out / "policy.json").write_text(json.dumps({
        "kind": "policy", "config": asdict(policy.cfg), "sampling_steps": sampling_steps,
        "obs_mean": np.asarray(obs_mean).tolist(), "obs_std": np.asarray(obs_std).tolist(), "tasks": tasks,
        "instructions": instructions, "goal_embeddings": goals.tolist()}))
    seal(out)


SAMPLERS = ("frozen", "cached", "uncached")


class Policy:
    """A saved policy, ready to act. `sampler`: "frozen" (served: MoDE with its expert cache, or the dense baseline,
    traced into one frozen graph), "cached" (the expert cache, eager) or "uncached" (routers at run time, eager)."""

    def __init__(self, path: Path, sampler: str = "frozen"):
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / "policy.json").exists():
            raise FileNotFoundError(f"{path} is not a saved policy (policy.json missing)")
        meta = json.loads((path / "policy.json").read_text())
        self.cfg = MoDEConfig(**meta["config"])
        self.net = MoDEPolicy(self.cfg)
        self.net.load_state_dict(load_file(path / "model.safetensors"))
        self.net.eval()
        self.tasks = list(meta["tasks"])
        self.instructions = list(meta["instructions"])
        self.goals = torch.tensor(meta["goal_embeddings"], dtype=torch.float32)
        self.mean = torch.tensor(meta["obs_mean"], dtype=torch.float32)
        self.std = torch.tensor(meta["obs_std"], dtype=torch.float32)
        self.sigmas = karras_sigmas(int(meta["sampling_steps"]))
        self.cache = None if self.cfg.dense else ExpertCache(self.net, self.sigmas)
        self.sampler, self._frozen = "", None
        self.use(sampler)

    def use(self, sampler: str) -> "Policy":
        """Switch how actions are sampled (same weights, same actions up to float rounding)."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {list(SAMPLERS)}")
        if sampler == "frozen" and self._frozen is None:
            self._frozen = freeze_sampler(self.net, self.sigmas, self.cache)
        self.sampler = sampler
        return self

    def using(self, sampler: str) -> "Policy":
        """A view of this policy with another sampler, sharing the loaded weights."""
        view = copy.copy(self)
        return view.use(sampler)

    def task_index(self, task: str) -> int:
        if task in self.tasks:
            return self.tasks.index(task)
        if task in self.instructions:
            return self.instructions.index(task)
        raise KeyError(f"unknown task {task!r}; this policy knows {self.tasks}")

    @torch.no_grad()
    def act(self, obs_history: np.ndarray, tasks: list[str], noise: torch.Tensor | None = None,
            seed: int | list[int] = 0) -> np.ndarray:
        """obs_history (B, obs_history, obs_dim) raw observations -> action chunk (B, chunk, act_dim) in [-1, 1].

        One seed draws the whole batch's noise; a list gives each instance its own, so an instance's actions do not
        depend on what else was batched with it."""
        obs = (torch.as_tensor(np.asarray(obs_history), dtype=torch.float32) - self.mean) / self.std
        goal = self.goals[[self.task_index(t) for t in tasks]]
        if noise is None:
            shape = (self.cfg.chunk, self.cfg.act_dim)
            if isinstance(seed, (list, tuple)):
                if len(seed) != len(obs):
                    raise ValueError(f"{len(seed)} seeds for {len(obs)} observation histories")
                noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seed])
            else:
                noise = torch.randn(len(obs), *shape, generator=torch.Generator().manual_seed(seed))
        if self.sampler == "frozen":
            out = self._frozen(obs, goal, noise)
        else:
            out = sample(self.net, obs, goal, noise, self.sigmas, cache=self.cache if self.sampler == "cached" else None)
        return out.clamp(-1, 1).numpy()

    def time_per_chunk(self, repeats: int = 20) -> float:
        obs = np.zeros((1, self.cfg.obs_history, self.cfg.obs_dim), np.float32)
        self.act(obs, [self.tasks[0]])
        t = time.perf_counter()
        for _ in range(repeats):
            self.act(obs, [self.tasks[0]])
        return (time.perf_counter() - t) / repeats
