"""Closed-loop evaluation in Meta-World MT10: rollouts with fixed seeds on task variations, success rate per task and
on average, inference latency and FLOPs per action chunk, and a trajectory plot per task (hand position over time;
a rendered frame strip needs an OpenGL context, which headless machines without EGL/OSMesa do not have)."""

from __future__ import annotations

from collections import deque

import numpy as np

from distillery.sim import mt10


def rollout(policy, task: str, *, variation: int, seed: int, max_steps: int = 500, execute: int = 4,
            act=None) -> dict:
    """Run one episode: every `execute` steps the policy predicts a chunk and its first `execute` actions run.
    `act(history, task, seed)` defaults to `policy.act`; the HTTP test passes a function that calls the endpoint."""
    env = mt10.make_env(task, variation)
    obs, _ = env.reset(seed=seed)
    history = deque([obs] * policy.cfg.obs_history, maxlen=policy.cfg.obs_history)
    act = act or (lambda h, t, s: policy.act(h[None], [t], seed=s)[0])
    hand, success, steps, calls = [], False, 0, 0
    limit = min(max_steps, mt10.max_steps(env))
    while steps < limit and not success:
        chunk = act(np.stack(history).astype(np.float32), task, seed * 7919 + calls)
        calls += 1
        for action in chunk[:execute]:
            obs, _, terminated, truncated, info = env.step(mt10.clip_action(action))
            history.append(obs)
            hand.append(np.asarray(obs[:3]))
            steps += 1
            if info.get("success"):
                success = True
                break
            if terminated or truncated or steps >= limit:
                break
    env.close()
    return {"success": success, "steps": steps, "policy_calls": calls, "hand": np.array(hand)}


def evaluate_policy(policy, *, tasks=mt10.TASKS, episodes_per_task: int = 5, seed: int = 1000, max_steps: int = 500,
                    execute: int = 4, progress=None) -> dict:
    """Success rate per task and on average over fixed (variation, seed) pairs disjoint from the demos' seeds."""
    per_task, trajectories = {}, {}
    for task in tasks:
        results = [rollout(policy, task, variation=seed + e, seed=seed + e, max_steps=max_steps, execute=execute)
                   for e in range(episodes_per_task)]
        per_task[task] = float(np.mean([r["success"] for r in results]))
        trajectories[task] = [r["hand"] for r in results]
        if progress:
            progress(task, per_task[task])
    return {"success_rate": float(np.mean(list(per_task.values()))), "per_task": per_task,
            "trajectories": trajectories}


def flops_per_chunk(policy) -> float:
    """Multiply-adds x2 of one action chunk (all sampling steps), counted with torch's FLOP counter."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    if policy.sampler == "frozen":  # the frozen graph runs the same ops as the eager cached sampler; count those
        policy = policy.using("cached")
    obs = np.zeros((1, policy.cfg.obs_history, policy.cfg.obs_dim), np.float32)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        policy.act(obs, [policy.tasks[0]])
    return float(counter.get_total_flops())


def trajectory_plot(trajectories: dict[str, list[np.ndarray]], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 5, figsize=(16, 6), squeeze=False)
    for ax, (task, runs) in zip(axes.flat, trajectories.items()):
        for hand in runs:
            if len(hand):
                ax.plot(hand[:, 0], hand[:, 1], alpha=0.7)
                ax.scatter(hand[-1:, 0], hand[-1:, 1], s=12)
        ax.set_title(task, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{title}: hand x-y path per episode (dot: last position)")
    fig.tight_layout()
    return fig
