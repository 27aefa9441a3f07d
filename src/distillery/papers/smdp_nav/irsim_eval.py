"""Cross-simulator check in ir-sim (its own kinematics, 2D lidar, collision checks, and moving obstacles that
avoid each other with RVO): scenarios of its own (static circles, an RVO crowd crossing the arena, walls), the
policy driven exactly as the endpoint is, from the raw scan, goal distance and bearing, and current velocity."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import yaml

Act = Callable[[np.ndarray, float, float, float, float], tuple[float, float, float]]


def world_yaml(cfg, seed: int, static: int = 6, crowd: int = 4) -> dict:
    """One ir-sim world: the robot crosses the arena, static circles, an RVO crowd whose members swap sides."""
    rng = np.random.default_rng(seed)
    w = cfg.world
    y0, y1 = rng.uniform(1.0, w - 1.0, 2)
    start, goal = [1.0, float(y0), float(rng.uniform(-np.pi, np.pi))], [w - 1.0, float(y1), 0.0]

    def free(margin):
        while True:
            p = rng.uniform(2.0, w - 2.0, 2)
            if min(np.hypot(*(p - start[:2])), np.hypot(*(p - goal[:2]))) > margin:
                return [float(p[0]), float(p[1]), 0.0]

    crowd_start = [free(1.5) for _ in range(crowd)]
    crowd_goal = [[w - s[0], w - s[1], 0.0] for s in crowd_start]
    walls = [[0, 0], [w, 0], [w, w], [0, w], [0, 0]]
    return {
        "world": {"height": w, "width": w, "step_time": cfg.tick, "sample_time": cfg.tick, "collision_mode": "stop"},
        "robot": [{"kinematics": {"name": "diff"}, "shape": {"name": "circle", "radius": cfg.robot_radius},
                   "state": start, "goal": goal, "vel_min": [0, -cfg.w_max], "vel_max": [cfg.v_max, cfg.w_max],
                   "goal_threshold": cfg.goal_tolerance,
                   "sensors": [{"type": "lidar2d", "range_min": 0, "range_max": cfg.lidar_range,
                                "angle_range": 2 * np.pi, "number": 4 * cfg.beams}]}],
        "obstacle": [
            {"number": crowd, "distribution": {"name": "manual"}, "kinematics": {"name": "omni"},
             "shape": [{"name": "circle", "radius": 0.3}], "behavior": {"name": "rvo", "vxmax": 0.5, "vymax": 0.5,
                                                                      "acce": 1.0, "factor": 1.0},
             "vel_max": [0.5, 0.5], "vel_min": [-0.5, -0.5], "state": crowd_start, "goal": crowd_goal,
             "arrive_mode": "position"},
            {"number": static, "distribution": {"name": "manual"},
             "shape": [{"name": "circle", "radius": float(r)} for r in rng.uniform(0.25, 0.5, static)],
             "state": [free(1.2) for _ in range(static)]},
            {"number": 1, "distribution": {"name": "manual"}, "state": [[0, 0, 0]],
             "shape": [{"name": "linestring", "vertices": walls}]},
        ]}


def resample_scan(scan: dict, beams: int) -> np.ndarray:
    """ir-sim's ranges onto the training lidar's beam angles (-pi + 2 pi k / beams, robot frame)."""
    ranges = np.asarray(scan["ranges"], np.float64)
    angles = scan["angle_min"] + scan["angle_increment"] * np.arange(len(ranges))
    want = np.linspace(-np.pi, np.pi, beams, endpoint=False)
    return np.interp(want, angles, ranges, period=2 * np.pi)


def episode(cfg, seed: int, act: Act, static: int = 6, crowd: int = 4) -> dict:
    """One ir-sim episode driven by `act(scan, goal_distance, goal_bearing, v, w) -> (v, w, duration)`."""
    import irsim

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "world.yaml"
        path.write_text(yaml.safe_dump(world_yaml(cfg, seed, static, crowd)))
        env = irsim.make(str(path), display=False)
    robot, t, decisions, path_len, v, w = env.robot, 0.0, 0, 0.0, 0.0, 0.0
    try:
        while t < cfg.max_time - 1e-9 and not (robot.arrive or robot.collision):
            x, y, th = env.get_robot_state().ravel()[:3]
            gx, gy = np.asarray(robot.goal).ravel()[:2]
            bearing = float(np.arctan2(gy - y, gx - x) - th)
            v, w, duration = act(resample_scan(env.get_lidar_scan(), cfg.beams), float(np.hypot(gx - x, gy - y)),
                                 float(np.arctan2(np.sin(bearing), np.cos(bearing))), v, w)
            decisions += 1
            for _ in range(max(1, int(round(duration / cfg.tick)))):
                env.step(np.array([[v], [w]]))
                t += cfg.tick
                path_len += abs(v) * cfg.tick
                if robot.arrive or robot.collision or t >= cfg.max_time - 1e-9:
                    break
    finally:
        env.end(0)
    return {"arrived": bool(robot.arrive), "collided": bool(robot.collision) and not robot.arrive, "time": t,
            "path": path_len, "decisions": decisions}


def evaluate(policy, episodes: int, seed: int = 0) -> dict:
    """success_rate, collision_rate, time_to_goal_s, decisions_per_episode of `policy` over ir-sim worlds."""
    os.environ.setdefault("MPLBACKEND", "Agg")

    def act(scan, d, b, v, w):
        vv, ww, tau = policy.command(scan[None], [d], [b], [v], [w])
        return float(vv[0]), float(ww[0]), float(tau[0])

    eps = [episode(policy.cfg, seed + i, act) for i in range(episodes)]
    ok = [e for e in eps if e["arrived"]]
    return {"success_rate": float(np.mean([e["arrived"] for e in eps])),
            "collision_rate": float(np.mean([e["collided"] for e in eps])),
            "time_to_goal_s": float(np.mean([e["time"] for e in ok])) if ok else float("nan"),
            "decisions_per_episode": float(np.mean([e["decisions"] for e in eps]))}
