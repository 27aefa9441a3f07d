"""DPPO for navigation: each rank steps its own environments, PPO's gradients are all-reduced by Fabric's DDP.

Variants: "smdp" (adaptive tau, SMDP advantage), "naive" (adaptive tau, per-decision discount), "fixed" (the
NavConfig's fixed_tau; SMDP advantage, which for a constant duration is ordinary GAE with gamma^tau). Every variant
gets the same budget of simulated time: an iteration collects decisions until this rank's environments have
together lived `rollout_s` simulated seconds each, and the number of iterations is the budget divided by that.
A resumed run restores the network, optimizer and random states; the environments restart their episodes.
An episode that reaches the time limit ends without a bootstrap (CleanRL's simplification; at 40 s it is rare).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from distillery.models.training import LogFn, make_fabric, resumable_loop
from distillery.papers.smdp_nav.advantage import naive_advantages, smdp_advantages
from distillery.papers.smdp_nav.env import NavConfig, NavVecEnv
from distillery.papers.smdp_nav.policy import save_policy
from distillery.rl.ppo import ActorCritic, PPOConfig, ppo_update

VARIANTS = ("smdp", "naive", "fixed")


def iterations(sim_budget_s: float, rollout_s: float, num_envs: int, world_size: int) -> int:
    return max(1, math.ceil(sim_budget_s / (rollout_s * num_envs * world_size)))


def train_policy(scenarios: dict, out_dir: Path, nav: NavConfig, ppo: PPOConfig, *, variant: str,
                 sim_budget_s: float, rollout_s: float, gamma: float = 0.9, seed: int = 0,
                 checkpoint_dir: Path | str | None = None, checkpoint_every: int = 10, on_log: LogFn | None = None,
                 log_every: int = 5, data_key: str = "") -> dict:
    nav, ppo = nav.check(), ppo.check()
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if (variant == "fixed") != bool(nav.fixed_tau):
        raise ValueError("the fixed variant needs NavConfig.fixed_tau > 0, the adaptive ones fixed_tau = 0")
    if not 0 < gamma <= 1 or sim_budget_s <= 0 or rollout_s < nav.tau_max:
        raise ValueError(f"need 0 < gamma <= 1, sim_budget_s > 0 and rollout_s >= tau_max ({nav.tau_max} s); got "
                         f"{gamma}, {sim_budget_s}, {rollout_s}")
    fabric = make_fabric()
    if fabric.device.type == "cpu":
        # A small MLP stepped between numpy simulator calls: intra-op threads only spin against the simulator and
        # the other workers (several times slower on a busy machine).
        torch.set_num_threads(1)
    torch.manual_seed(seed)
    net = ActorCritic(nav.obs_dim, nav.act_dim, ppo.hidden, ppo.init_log_std)
    model, opt = fabric.setup(net, torch.optim.Adam(net.parameters(), lr=ppo.lr, eps=1e-5))
    rank = fabric.global_rank
    gen = torch.Generator().manual_seed(seed + 1000 * rank)  # each rank its own actions and minibatches
    env = NavVecEnv(scenarios, nav, ppo.num_envs, gamma=gamma, seed=seed + 1000 * rank)
    obs = env.reset()[0]
    steps = iterations(sim_budget_s, rollout_s, ppo.num_envs, fabric.world_size)
    totals = {"sim_s": 0.0, "decisions": 0, "episodes": 0, "arrived": 0, "collided": 0}
    recent: list[tuple[bool, bool]] = []
    last: dict = {}

    def step_fn(_: int) -> dict:
        nonlocal obs
        buf: dict[str, list] = {k: [] for k in ("obs", "actions", "logprobs", "values", "next_values", "r_sum",
                                                "r_disc", "duration", "done")}
        lived = 0.0
        while lived < rollout_s * ppo.num_envs:
            with torch.no_grad():
                o = torch.from_numpy(obs)
                action, logp, _, value = net(o, generator=gen)
            obs, r_sum, term, trunc, info = env.step(action.numpy())
            with torch.no_grad():
                next_value = net.value(torch.from_numpy(obs)).numpy()
            for k, v in (("obs", o.numpy()), ("actions", action.numpy()), ("logprobs", logp.numpy()),
                         ("values", value.numpy()), ("next_values", next_value), ("r_sum", r_sum),
                         ("r_disc", info["reward_disc"]), ("duration", info["duration"]), ("done", info["done"])):
                buf[k].append(v)
            lived += float(info["duration"].sum())
            for a, c in zip(info["arrived"][info["done"]], info["collided"][info["done"]]):
                recent.append((bool(a), bool(c)))
            totals["episodes"] += int(info["done"].sum())
            totals["arrived"] += int(info["arrived"].sum())
            totals["collided"] += int(info["collided"].sum())
        b = {k: np.asarray(v) for k, v in buf.items()}  # (T, N)
        done = b["done"].astype(np.float64)
        if variant == "naive":
            adv, ret = naive_advantages(b["r_sum"], nav.tick, b["values"], b["next_values"], done, gamma, ppo.lam)
        else:
            adv, ret = smdp_advantages(b["r_disc"], b["duration"], b["values"], b["next_values"], done, gamma, ppo.lam)
        flat = {"obs": b["obs"].reshape(-1, nav.obs_dim), "actions": b["actions"].reshape(-1, nav.act_dim),
                "logprobs": b["logprobs"].ravel(), "advantages": adv.ravel(), "returns": ret.ravel(),
                "values": b["values"].ravel()}
        batch = {k: torch.as_tensor(np.asarray(v), dtype=torch.float32) for k, v in flat.items()}
        stats = ppo_update(fabric, model, opt, ppo, batch, gen)
        totals["sim_s"] += lived
        totals["decisions"] += int(b["done"].size)
        del recent[:-200]
        last.update(stats, mean_duration_s=float(b["duration"].mean()), decisions=float(b["done"].size),
                    success_rate=float(np.mean([a for a, _ in recent])) if recent else 0.0,
                    collision_rate=float(np.mean([c for _, c in recent])) if recent else 0.0)
        return {"loss": stats["loss"]}

    def log(metrics: dict, step: int) -> None:
        if on_log:
            on_log({**metrics, **{f"{variant}_{k}": v for k, v in last.items()}}, step)

    t0 = time.perf_counter()
    metrics = resumable_loop(variant, model, opt, steps, checkpoint_dir, checkpoint_every, gen, step_fn,
                             log if on_log else None, log_every,
                             dict(nav=nav.as_dict(), ppo=ppo.as_dict(), variant=variant, sim_budget_s=sim_budget_s,
                                  rollout_s=rollout_s, gamma=gamma, seed=seed, data=data_key), fabric=fabric)
    wall = time.perf_counter() - t0
    # Totals over every rank: the simulated time and decisions the whole DPPO run consumed.
    summed = {k: float(fabric.all_reduce(torch.tensor(float(v)), reduce_op="sum")) for k, v in totals.items()}
    if fabric.is_global_zero:
        save_policy(Path(out_dir), net.cpu(), nav, variant=variant, gamma=gamma)
    fabric.barrier()
    return {**metrics, "iterations": float(steps), "sim_seconds": summed["sim_s"], "decisions": summed["decisions"],
            "train_episodes": summed["episodes"],
            "train_success_rate": summed["arrived"] / max(summed["episodes"], 1.0),
            "train_collision_rate": summed["collided"] / max(summed["episodes"], 1.0),
            "final_success_rate": last.get("success_rate", 0.0), "sim_seconds_per_wall_s": summed["sim_s"] / wall,
            "world_size": float(fabric.world_size)}
