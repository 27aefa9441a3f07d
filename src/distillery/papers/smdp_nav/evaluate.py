"""Closed-loop evaluation on a scenario set: one episode per scenario with the deterministic policy; success,
collision, time to goal, path length and decisions per episode, overall and per density level (95% normal CIs
over the episodes); every decision's chosen duration against the local obstacle density; trajectory plots."""

from __future__ import annotations

import numpy as np

from distillery.papers.smdp_nav.env import NavVecEnv, local_density


def run_episodes(policy, arrays: dict, *, record: bool = False, batch: int = 64) -> dict:
    n = len(arrays["start"])
    ep = {k: np.zeros(n) for k in ("arrived", "collided", "time", "path", "decisions")}
    taus, dens, trails = [], [], {}
    for lo in range(0, n, batch):
        idx = np.arange(lo, min(n, lo + batch))
        env = NavVecEnv(arrays, policy.cfg, len(idx), autoreset=False, record=record)
        obs, info = env.reset(options={"scenarios": idx})
        scan = info["scan"]
        while not env.ended.all():
            live = ~env.ended
            obs, _, _, _, info = env.step(policy.act(obs))
            taus.append(info["duration"][live])
            dens.append(local_density(policy.cfg, scan[live]))
            scan = info["scan"]
            done = info["done"] & live
            for k, src in (("arrived", "arrived"), ("collided", "collided"), ("time", "time"), ("path", "path"),
                           ("decisions", "episode_decisions")):
                ep[k][idx[done]] = info[src][done]
        if record:
            trails.update({int(i): np.asarray(t) for i, t in zip(idx, env.trails)})
    return {**ep, "level": np.asarray(arrays["level"]), "taus": np.concatenate(taus), "local_density": np.concatenate(dens),
            "trails": trails}


def _ci(x: np.ndarray) -> float:
    return float(1.96 * x.std() / np.sqrt(len(x))) if len(x) > 1 else float("nan")


def summarize(result: dict, levels) -> dict:
    """success_rate (+ _ci), collision_rate, time_to_goal_s (successful episodes), path_length_m (successful),
    decisions_per_episode, mean_duration_s; the same per density level as `<level>_...`."""

    def one(mask) -> dict:
        a, c = result["arrived"][mask], result["collided"][mask]
        ok = mask & (result["arrived"] > 0)
        return {"success_rate": float(a.mean()), "success_rate_ci": _ci(a), "collision_rate": float(c.mean()),
                "time_to_goal_s": float(result["time"][ok].mean()) if ok.any() else float("nan"),
                "path_length_m": float(result["path"][ok].mean()) if ok.any() else float("nan"),
                "decisions_per_episode": float(result["decisions"][mask].mean()), "episodes": float(mask.sum())}

    out = {**one(np.ones_like(result["arrived"], bool)), "mean_duration_s": float(result["taus"].mean())}
    for i, name in enumerate(levels):
        out.update({f"{name}_{k}": v for k, v in one(result["level"] == i).items()})
    return out


def duration_vs_density(results: dict[str, dict], bins: int = 8):
    """Mean chosen duration per local-density bin for each policy (the adaptive one should act more often when
    crowded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    edges = np.linspace(0, 1, bins + 1)
    for name, r in results.items():
        which = np.clip(np.digitize(r["local_density"], edges) - 1, 0, bins - 1)
        means = [r["taus"][which == b].mean() if (which == b).sum() >= 5 else np.nan for b in range(bins)]
        ax.plot((edges[:-1] + edges[1:]) / 2, means, marker="o", label=name)
    ax.set_xlabel("local obstacle density (fraction of lidar beams < 1.5 m)")
    ax.set_ylabel("chosen duration (s)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def binned_durations(r: dict, bins: int = 4) -> list[float]:
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(r["local_density"], edges) - 1, 0, bins - 1)
    return [float(r["taus"][which == b].mean()) if (which == b).any() else float("nan") for b in range(bins)]


def trajectory_plot(arrays: dict, i: int, results: dict[str, dict], world: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    for p, r, mv in zip(arrays["obs_pos"][i], arrays["obs_r"][i], arrays["moving"][i]):
        if r > 0:
            ax.add_patch(plt.Circle(p, r, color="tab:orange" if mv else "0.4", alpha=0.5))
    for name, res in results.items():
        t = res["trails"].get(i)
        if t is not None and len(t):
            end = "goal" if res["arrived"][i] else "collision" if res["collided"][i] else "time-out"
            ax.plot(t[:, 0], t[:, 1], label=f"{name} ({end})")
    ax.plot(*arrays["start"][i][:2], "ks")
    ax.plot(*arrays["goal"][i], "r*", markersize=12)
    ax.set_xlim(0, world), ax.set_ylim(0, world), ax.set_aspect("equal")
    ax.set_title(f"scenario {i} (moving obstacles in orange at their start)", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
