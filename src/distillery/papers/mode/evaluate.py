"""Closed-loop evaluation in Meta-World MT10: rollouts with fixed seeds on task variations, success rate per task and
on average, inference latency and FLOPs per action chunk, a frame strip per task (MuJoCo renders headless through
EGL; without an OpenGL driver the strip is skipped and the reason returned) and a hand-path plot per task."""

from __future__ import annotations

import statistics
import time

import os
from collections import deque

import numpy as np

from distillery.sim import mt10


def rollout(policy, task: str, *, variation: int, seed: int, max_steps: int = 500, execute: int = 4,
            act=None, frames_every: int = 0, benchmark_seed: int = 0) -> dict:
    """Run one episode: every `execute` steps the policy predicts a chunk and its first `execute` actions run.
    `act(history, task, seed)` defaults to `policy.act`; the HTTP test passes a function that calls the endpoint.
    `frames_every` > 0 renders a frame at the start, every that many steps, and at the end."""
    env = mt10.make_env(task, variation, benchmark_seed=benchmark_seed)
    if frames_every:
        _camera(env)
    obs, _ = env.reset(seed=seed)
    frames, render_error = [], ""

    def grab():
        nonlocal render_error
        if frames_every and not render_error:
            try:
                frames.append(np.rot90(env.render(), 2).copy())  # the corner camera is mounted upside down
            except Exception as e:  # no OpenGL driver: keep the rollout, report why there are no frames
                render_error = f"{type(e).__name__}: {e}"
    history = deque([obs] * policy.cfg.obs_history, maxlen=policy.cfg.obs_history)
    act = act or (lambda h, t, s: policy.act(h[None], [t], seed=s)[0])
    hand, success, steps, calls = [], False, 0, 0
    try:
        limit = min(max_steps, mt10.max_steps(env))
        grab()
        while steps < limit and not success:
            chunk = act(np.stack(history).astype(np.float32), task, seed * 7919 + calls)
            calls += 1
            for action in chunk[:execute]:
                obs, _, terminated, truncated, info = env.step(mt10.clip_action(action))
                history.append(obs)
                hand.append(np.asarray(obs[:3]))
                steps += 1
                if frames_every and steps % frames_every == 0:
                    grab()
                if info.get("success"):
                    success = True
                    break
                if terminated or truncated or steps >= limit:
                    break
        if frames_every and steps % frames_every:
            grab()
    finally:
        env.close()  # frees the GL context too
    return {"success": success, "steps": steps, "policy_calls": calls, "hand": np.array(hand), "frames": frames,
            "render_error": render_error}


FRAME_SIZE = 128


def _camera(env) -> None:
    """Render small frames from the fixed corner camera, headless (EGL) unless the user chose a GL backend."""
    import mujoco

    os.environ.setdefault("MUJOCO_GL", "egl")  # read when the first frame opens the GL context
    env.render_mode = "rgb_array"
    renderer = env.mujoco_renderer  # creates its viewer at the first render, with these settings
    renderer.width = renderer.height = FRAME_SIZE
    renderer.camera_id = mujoco.mj_name2id(env.model, mujoco.mjtObj.mjOBJ_CAMERA, "corner")


def frame_strip(frames: list[np.ndarray], n: int = 8) -> np.ndarray:
    """n frames evenly spaced over the episode (first and last included), side by side."""
    pick = np.unique(np.linspace(0, len(frames) - 1, min(n, len(frames))).round().astype(int))
    return np.concatenate([frames[i] for i in pick], axis=1)


def evaluate_policy(policy, *, tasks=mt10.TASKS, episodes_per_task: int = 5, seed: int = 1000, max_steps: int = 500,
                    execute: int = 4, frames_every: int = 0, benchmark_seed: int = 0, progress=None) -> dict:
    """Success rate per task and on average over fixed (variation, seed) pairs. MT10's protocol evaluates on the
    variations it trains on (benchmark_seed 0, which the demonstrations cover; the reset seeds and the policy's
    noise differ); another `benchmark_seed` evaluates on unseen variations. With `frames_every`, the first
    episode of each task is rendered into a frame strip."""
    per_task, trajectories, strips, render_error = {}, {}, {}, ""
    for task in tasks:
        results = [rollout(policy, task, variation=seed + e, seed=seed + e, max_steps=max_steps, execute=execute,
                           frames_every=frames_every if e == 0 else 0, benchmark_seed=benchmark_seed)
                   for e in range(episodes_per_task)]
        per_task[task] = float(np.mean([r["success"] for r in results]))
        trajectories[task] = [r["hand"] for r in results]
        if results[0]["frames"]:
            strips[task] = frame_strip(results[0]["frames"])
        render_error = render_error or results[0]["render_error"]
        if progress:
            progress(task, per_task[task])
    return {"success_rate": float(np.mean(list(per_task.values()))), "per_task": per_task,
            "trajectories": trajectories, "frame_strips": strips, "render_error": render_error}


# MT10's variations from another benchmark seed: task instances the demonstrations never showed.
UNSEEN_BENCHMARK_SEED = 7


def median_latencies(policies, obs, tasks, repeats: int) -> list[float]:
    """Median seconds per chunk of each policy, timed in turn within every round so that drifts of the machine
    (clock, caches, neighbours) fall on all of them alike."""
    times = [[] for _ in policies]
    for i in range(repeats):
        for p, out in zip(policies, times):
            t = time.perf_counter()
            p.act(obs, tasks, seed=i)
            out.append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


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


def frame_strips_figure(strips: dict[str, np.ndarray], title: str):
    """One row per task: frames of its first evaluation episode, start to end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(strips), 1, figsize=(12, 1.8 * len(strips)), squeeze=False)
    for ax, (task, strip) in zip(axes[:, 0], strips.items()):
        ax.imshow(strip)
        ax.set_title(task, loc="left", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{title}: first evaluation episode per task, start to end")
    fig.tight_layout()
    return fig
