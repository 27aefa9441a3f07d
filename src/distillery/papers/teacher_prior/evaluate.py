"""Closed-loop evaluation: one episode per held-out terrain seed (seeds never drawn in training), deterministic
policies; mean return with its 95% CI over the episodes, fall rate, distance travelled, tracking error of the
commanded velocity; the auxiliary head's R^2 on the visited states; environment steps to reach 80% of the final
training return (from the learning curve); a frame strip of an episode per policy (headless EGL; without an OpenGL
driver the strip is skipped and the reason returned)."""

from __future__ import annotations

import os

import numpy as np

from distillery.papers.teacher_prior.env import AUX_NAMES, TerrainConfig, TerrainVecEnv
from distillery.papers.teacher_prior.train import EVAL_SEEDS


def run_episodes(policy, cfg: TerrainConfig, episodes: int, noise: float, seed: int = 0, batch: int = 16,
                 terrain_seeds: tuple[int, int] = EVAL_SEEDS) -> dict:
    """`episodes` episodes on terrain seeds terrain_seeds[0] + seed*episodes + k (the held-out evaluation's unless
    told: the sweep passes VALID_SEEDS); the teacher sees its privileged observations, students their noisy history
    (at `noise` x NOISE_SCALE)."""
    ep = {k: np.zeros(episodes) for k in ("return", "fell", "distance", "tracking_error", "length")}
    aux_true, aux_pred = [], []
    for lo in range(0, episodes, batch):
        idx = np.arange(lo, min(episodes, lo + batch))
        env = TerrainVecEnv(cfg, len(idx), seed=seed * 7919 + lo, terrain_seeds=terrain_seeds, obs_noise=noise)
        obs = env.reset([terrain_seeds[0] + seed * episodes + int(i) for i in idx])
        live = np.ones(len(idx), bool)
        err, steps = np.zeros(len(idx)), np.zeros(len(idx))
        while live.any():
            if policy.has_aux:
                aux_true.append(obs["aux"][live])
                aux_pred.append(policy.predict_aux(obs["student"][live]))
            obs, _, _, _, info = env.step(policy.act(obs[policy.obs_key]))
            steps += live
            err += np.where(live, np.abs(info["x_velocity"] - info["command"]), 0.0)
            for j, final in enumerate(info["final"]):
                if final is not None and live[j]:  # only each environment's first episode counts
                    i = idx[j]
                    ep["return"][i], ep["fell"][i] = info["episode_return"][j], info["fell"][j]
                    ep["distance"][i], ep["length"][i] = info["distance"][j], steps[j]
                    ep["tracking_error"][i] = err[j] / steps[j]
                    live[j] = False
    out = dict(ep)
    if aux_true:
        out["aux_true"], out["aux_pred"] = np.concatenate(aux_true), np.concatenate(aux_pred)
    return out


def _ci(x: np.ndarray) -> float:
    return float(1.96 * x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


def r2(true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Coefficient of determination per column (nan where the truth does not vary)."""
    ss_res = ((true - pred) ** 2).sum(0)
    ss_tot = ((true - true.mean(0)) ** 2).sum(0)
    return np.where(ss_tot > 1e-12, 1 - ss_res / np.maximum(ss_tot, 1e-12), np.nan)


def summarize(r: dict) -> dict:
    out = {"return": float(r["return"].mean()), "return_ci": _ci(r["return"]), "fall_rate": float(r["fell"].mean()),
           "fall_rate_ci": _ci(r["fell"]), "distance": float(r["distance"].mean()),
           "tracking_error": float(r["tracking_error"].mean()), "episodes": float(len(r["return"]))}
    if "aux_true" in r:
        per = r2(r["aux_true"], r["aux_pred"])
        out.update({f"aux_r2_{n}": float(v) for n, v in zip(AUX_NAMES, per) if np.isfinite(v)})
        out["aux_r2"] = float(np.nanmean(per))
        out["aux_r2_velocity"] = float(np.nanmean(per[:2]))
    return out


def final_value(curve: list) -> float:
    """A learning curve's final value: the mean of its last five points; nan for an empty curve."""
    return float(np.asarray(curve, np.float64)[-5:, 1].mean()) if curve else float("nan")


def steps_to_fraction(curve: list, fraction: float = 0.8, final: float | None = None) -> float:
    """Environment steps at which the learning curve first reaches `fraction` of `final` (default: its own final
    value); the curve's last step if it never does; nan for an empty curve."""
    if not curve:
        return float("nan")
    c = np.asarray(curve, np.float64)
    final = final_value(curve) if final is None else final
    reached = np.flatnonzero(c[:, 1] >= fraction * final)
    return float(c[reached[0], 0]) if len(reached) else float(c[-1, 0])


FRAME_SIZE = (96, 160)


def frame_strip(policy, cfg: TerrainConfig, steps: int = 120, n: int = 8, seed: int = 0) -> tuple[np.ndarray | None, str]:
    """n frames of one held-out episode from the tracking camera, side by side; (None, reason) without GL."""
    os.environ.setdefault("MUJOCO_GL", "egl")  # read when the first renderer opens its GL context
    try:
        import mujoco

        env = TerrainVecEnv(cfg, 1, seed=seed, terrain_seeds=EVAL_SEEDS)
        obs = env.reset([EVAL_SEEDS[1] - 1 - seed])
        w = env.walkers[0]
        renderer = mujoco.Renderer(w.model, *FRAME_SIZE)
        frames = []
        for t in range(steps):
            if t % max(1, steps // n) == 0 and len(frames) < n:
                renderer.update_scene(w.data, camera="track")
                frames.append(renderer.render().copy())
            obs, _, term, trunc, _ = env.step(policy.act(obs[policy.obs_key]))
            if term[0] or trunc[0]:
                break
        renderer.close()
        return np.concatenate(frames, axis=1), ""
    except Exception as e:  # noqa: BLE001 - no GL driver / EGL device: the strip is optional
        return None, f"{type(e).__name__}: {e}"[:300]


def learning_curves_figure(curves: dict[str, list], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, c in curves.items():
        if c:
            c = np.asarray(c)
            ax.plot(c[:, 0], c[:, 1], label=name)
    ax.set_xlabel("environment steps")
    ax.set_ylabel(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def strips_figure(strips: dict[str, np.ndarray]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(strips), 1, figsize=(12, 1.6 * len(strips)), squeeze=False)
    for ax, (name, strip) in zip(axes[:, 0], strips.items()):
        ax.imshow(strip)
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    return fig
