"""Scenario sets: start, goal, circular static and moving obstacles, at named obstacle densities; and their
validation (start and goal free, goal reachable from the start around the static obstacles, obstacle density in
range). A set is stored as `scenarios.npz` (arrays, obstacles padded with radius 0) + `manifest.json`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from distillery.data.arrays import read_array_set, write_manifest, write_npz
from distillery.papers.smdp_nav.env import NavConfig

# name -> (static obstacles, moving obstacles)
DENSITIES: dict[str, tuple[int, int]] = {"sparse": (4, 1), "medium": (9, 3), "crowded": (15, 6)}
ARRAYS = ("start", "goal", "obs_pos", "obs_vel", "obs_r", "moving", "level")
GRID = 0.1  # metres per cell of the reachability grid


def generate(n_per_level: int, seed: int, cfg: NavConfig, levels: dict[str, tuple[int, int]] = DENSITIES,
             max_tries: int = 100) -> dict:
    """n_per_level valid scenarios per density level; a sample that fails validation is drawn again."""
    rng = np.random.default_rng(seed)
    m = max(s + d for s, d in levels.values())
    out: dict[str, list] = {k: [] for k in ARRAYS}
    redrawn = 0
    for li, (name, (n_static, n_moving)) in enumerate(levels.items()):
        for _ in range(n_per_level):
            for _attempt in range(max_tries):
                s = _sample(rng, cfg, n_static, n_moving, m)
                if not problems(s, cfg):
                    break
                redrawn += 1
            else:
                raise RuntimeError(f"no valid {name} scenario in {max_tries} draws; lower its obstacle count")
            for k in ARRAYS[:-1]:
                out[k].append(s[k])
            out["level"].append(li)
    arrays = {k: np.asarray(v) for k, v in out.items()}
    arrays["levels"] = np.asarray(list(levels))
    arrays["redrawn"] = np.asarray(redrawn)
    return arrays


def _sample(rng, cfg: NavConfig, n_static: int, n_moving: int, m: int) -> dict:
    w = cfg.world
    start = np.array([rng.uniform(0.6, 1.5), rng.uniform(0.6, w - 0.6), rng.uniform(-np.pi, np.pi)])
    goal = np.array([rng.uniform(w - 1.5, w - 0.6), rng.uniform(0.6, w - 0.6)])
    if rng.random() < 0.5:  # either direction across the arena
        start[0], goal[0] = w - start[0], w - goal[0]
    pos, vel, r, moving = np.zeros((m, 2)), np.zeros((m, 2)), np.zeros(m), np.zeros(m, bool)
    for i in range(n_static + n_moving):
        r[i] = rng.uniform(0.25, 0.5)
        for _ in range(50):  # keep obstacles off the start and the goal
            p = rng.uniform(1.0, w - 1.0, 2)
            if min(np.linalg.norm(p - start[:2]), np.linalg.norm(p - goal)) > r[i] + 1.0:
                break
        pos[i] = p
        if i >= n_static:
            moving[i] = True
            ang, speed = rng.uniform(-np.pi, np.pi), rng.uniform(0.2, 0.6)
            vel[i] = speed * np.array([np.cos(ang), np.sin(ang)])
    return {"start": start, "goal": goal, "obs_pos": pos, "obs_vel": vel, "obs_r": r, "moving": moving}


def density(s: dict, cfg: NavConfig) -> float:
    """Fraction of the arena covered by obstacles."""
    return float(np.pi * (np.asarray(s["obs_r"]) ** 2).sum() / cfg.world ** 2)


def reachable(s: dict, cfg: NavConfig) -> bool:
    """Is the goal connected to the start on a grid of the arena minus the static obstacles and walls inflated by
    the robot radius (moving obstacles pass; they cannot wall the goal in for good)."""
    from scipy import ndimage

    cells = int(round(cfg.world / GRID))
    c = (np.arange(cells) + 0.5) * GRID
    x, y = np.meshgrid(c, c, indexing="ij")
    free = (x > cfg.robot_radius) & (x < cfg.world - cfg.robot_radius) & \
        (y > cfg.robot_radius) & (y < cfg.world - cfg.robot_radius)
    for p, r, mv in zip(np.asarray(s["obs_pos"]), np.asarray(s["obs_r"]), np.asarray(s["moving"])):
        if r > 0 and not mv:
            free &= (x - p[0]) ** 2 + (y - p[1]) ** 2 > (r + cfg.robot_radius) ** 2
    labels, _ = ndimage.label(free)

    def cell(p):
        return tuple(np.clip((np.asarray(p[:2]) / GRID).astype(int), 0, cells - 1))

    a, b = labels[cell(s["start"])], labels[cell(s["goal"])]
    return bool(a and a == b)


def problems(s: dict, cfg: NavConfig, density_range: tuple[float, float] = (0.0, 1.0)) -> list[str]:
    """What is wrong with one scenario (empty when it is valid); density_range in fractions of the arena."""
    out = []
    w, rr = cfg.world, cfg.robot_radius
    start, goal = np.asarray(s["start"])[:2], np.asarray(s["goal"])
    for name, p in (("start", start), ("goal", goal)):
        if not (rr <= p).all() or not (p <= w - rr).all():
            out.append(f"{name} {p.round(2).tolist()} is outside the arena")
    obs_pos, obs_r = np.asarray(s["obs_pos"]), np.asarray(s["obs_r"])
    real = obs_r > 0
    for name, p in (("start", start), ("goal", goal)):
        gap = np.linalg.norm(obs_pos[real] - p, axis=1) - obs_r[real] - rr
        if (gap < 0.1).any():
            out.append(f"{name} overlaps an obstacle")
    if np.linalg.norm(goal - start) < 2.0:
        out.append("goal closer than 2 m to the start")
    dens = density(s, cfg)
    if not density_range[0] <= dens <= density_range[1]:
        out.append(f"obstacle density {dens:.3f} of the arena outside [{density_range[0]:.3f}, {density_range[1]:.3f}]")
    if not out and not reachable(s, cfg):
        out.append("goal not reachable from the start")
    return out


def scenario(arrays: dict, i: int) -> dict:
    return {k: arrays[k][i] for k in ARRAYS}


def validate(arrays: dict, cfg: NavConfig, min_density: float, max_density: float) -> dict:
    """Every scenario of a set checked; densities are fractions of the arena area. Returns per-scenario problems."""
    bad = {}
    for i in range(len(arrays["start"])):
        p = problems(scenario(arrays, i), cfg, (min_density, max_density))
        if p:
            bad[i] = p
    dens = np.array([density(scenario(arrays, i), cfg) for i in range(len(arrays["start"]))])
    return {"scenarios": len(dens), "invalid": bad, "density_min": float(dens.min()), "density_max": float(dens.max()),
            "density_mean": float(dens.mean())}


def save(arrays: dict, out: Path, cfg: NavConfig, **meta) -> dict:
    digest = write_npz(out / "scenarios.npz", arrays)
    return write_manifest(out, {
        "scenarios": int(len(arrays["start"])), "levels": [str(x) for x in arrays["levels"]],
        "per_level": {str(name): int((arrays["level"] == i).sum()) for i, name in enumerate(arrays["levels"])},
        "nav_config": cfg.as_dict(), "content_sha256": digest, **meta})


def load(path: Path) -> tuple[dict, dict]:
    return read_array_set(path, "scenarios.npz", "scenario set")
