"""A vectorized 2D navigation world (gymnasium's VectorEnv API, batched numpy over N environments).

A square arena with walls, circular static obstacles and circular obstacles moving at constant velocity (bouncing
off the walls), a differential-drive robot (unicycle kinematics) with a 2D lidar, the goal in polar coordinates
relative to the robot. One `step` is one decision per environment: (v, w, tau) held for round(tau / tick) ticks, cut
short by collision, arrival or the time limit; `info` carries each decision's realized duration, its reward summed
undiscounted (the `reward` returned) and discounted per tick with gamma per second (`reward_disc`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import gymnasium as gym
import numpy as np


@dataclass(frozen=True)
class NavConfig:
    world: float = 10.0  # arena side (m)
    robot_radius: float = 0.2
    v_max: float = 1.0  # m/s (v in [0, v_max])
    w_max: float = 2.0  # rad/s (w in [-w_max, w_max])
    tick: float = 0.1  # simulator step Delta (s)
    tau_min: float = 0.1  # bounds of the chosen duration (s)
    tau_max: float = 1.0
    fixed_tau: float = 0.0  # > 0: every decision lasts this long and the action is (v, w)
    beams: int = 36  # lidar beams over 360 degrees
    lidar_range: float = 4.0
    goal_tolerance: float = 0.3
    max_time: float = 40.0  # episode limit (simulated seconds)
    arrive_reward: float = 10.0
    collision_reward: float = -10.0
    progress_reward: float = 1.0  # per metre of distance to the goal gained
    time_penalty: float = 0.2  # per simulated second

    def check(self) -> "NavConfig":
        problems = []
        if not 0 < self.tick <= self.tau_min <= self.tau_max:
            problems.append(f"need 0 < tick <= tau_min <= tau_max, got {self.tick}, {self.tau_min}, {self.tau_max}")
        if self.fixed_tau and not self.tick <= self.fixed_tau:
            problems.append(f"fixed_tau must be >= tick ({self.tick}), got {self.fixed_tau}")
        if self.beams < 4 or self.lidar_range <= 0 or self.world <= 4 * self.robot_radius:
            problems.append("need beams >= 4, lidar_range > 0 and a world larger than the robot")
        if problems:
            raise ValueError("invalid NavConfig: " + "; ".join(problems))
        return self

    @property
    def act_dim(self) -> int:
        return 2 if self.fixed_tau else 3

    @property
    def obs_dim(self) -> int:
        return self.beams + 5

    def as_dict(self) -> dict:
        return asdict(self)


def decode_action(cfg: NavConfig, action: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Actions in [-1, 1]^d (clipped) -> v (m/s), w (rad/s), ticks to hold them (>= 1)."""
    a = np.clip(np.asarray(action, np.float64), -1.0, 1.0)
    v = (a[:, 0] + 1) / 2 * cfg.v_max
    w = a[:, 1] * cfg.w_max
    tau = np.full(len(a), cfg.fixed_tau) if cfg.fixed_tau else cfg.tau_min + (a[:, 2] + 1) / 2 * (cfg.tau_max - cfg.tau_min)
    return v, w, np.maximum(1, np.round(tau / cfg.tick)).astype(np.int64)


def lidar(cfg: NavConfig, pos: np.ndarray, heading: np.ndarray, obs_pos: np.ndarray, obs_r: np.ndarray) -> np.ndarray:
    """Ranges (N, beams) from the robot centre to the nearest circle or wall, capped at lidar_range. Beam 0 points
    backwards, beams go counter-clockwise; padded obstacles have radius 0 and are ignored."""
    ang = heading[:, None] + np.linspace(-np.pi, np.pi, cfg.beams, endpoint=False)[None]
    d = np.stack([np.cos(ang), np.sin(ang)], -1)  # (N, B, 2)
    f = pos[:, None, :] - obs_pos  # (N, M, 2)
    b = np.einsum("nbk,nmk->nbm", d, f)
    c = (f ** 2).sum(-1)[:, None, :] - obs_r[:, None, :] ** 2
    disc = b ** 2 - c
    t = -b - np.sqrt(np.maximum(disc, 0))
    hit = (disc >= 0) & (obs_r[:, None, :] > 0) & (t + np.sqrt(np.maximum(disc, 0)) >= 0)
    t = np.where(hit, np.maximum(t, 0.0), np.inf).min(-1)
    with np.errstate(divide="ignore"):
        wx = np.where(d[..., 0] > 0, (cfg.world - pos[:, None, 0]) / d[..., 0],
                      np.where(d[..., 0] < 0, -pos[:, None, 0] / d[..., 0], np.inf))
        wy = np.where(d[..., 1] > 0, (cfg.world - pos[:, None, 1]) / d[..., 1],
                      np.where(d[..., 1] < 0, -pos[:, None, 1] / d[..., 1], np.inf))
    return np.minimum(np.minimum(t, np.minimum(wx, wy)), cfg.lidar_range)


def observe(cfg: NavConfig, scan: np.ndarray, pos, heading, goal, v, w) -> np.ndarray:
    """The policy's input: scan / range, goal distance / world, cos and sin of the goal bearing, v / v_max, w / w_max."""
    rel = goal - pos
    bearing = np.arctan2(rel[:, 1], rel[:, 0]) - heading
    return np.concatenate([scan / cfg.lidar_range, np.stack([
        np.linalg.norm(rel, axis=1) / cfg.world, np.cos(bearing), np.sin(bearing), v / cfg.v_max, w / cfg.w_max], 1)],
        1).astype(np.float32)


def local_density(cfg: NavConfig, scan: np.ndarray, radius: float = 1.5) -> np.ndarray:
    """Fraction of lidar beams that see an obstacle (walls included) within `radius` metres."""
    return (np.asarray(scan) < radius).mean(-1)


class NavVecEnv(gym.vector.VectorEnv):
    """N environments over a scenario set (`scenarios.py` arrays). With `autoreset` an ended episode restarts on a
    scenario drawn at random; without it (evaluation) `reset(options={"scenarios": idx})` places each environment
    on a given scenario and an ended environment stays ended (its later steps are no-ops with done=True)."""

    def __init__(self, scenarios: dict, cfg: NavConfig, num_envs: int, gamma: float = 0.9, seed: int = 0,
                 autoreset: bool = True, record: bool = False):
        self.cfg, self.scen, self.gamma, self.autoreset, self.record = cfg.check(), scenarios, gamma, autoreset, record
        self.num_envs = num_envs
        self.single_observation_space = gym.spaces.Box(-np.inf, np.inf, (cfg.obs_dim,), np.float32)
        self.single_action_space = gym.spaces.Box(-1.0, 1.0, (cfg.act_dim,), np.float32)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, num_envs)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, num_envs)
        self.rng = np.random.default_rng(seed)
        n, m = num_envs, scenarios["obs_pos"].shape[1]
        self.pos, self.heading = np.zeros((n, 2)), np.zeros(n)
        self.goal, self.v, self.w, self.t = np.zeros((n, 2)), np.zeros(n), np.zeros(n), np.zeros(n)
        self.obs_pos, self.obs_vel, self.obs_r = np.zeros((n, m, 2)), np.zeros((n, m, 2)), np.zeros((n, m))
        self.scenario = np.zeros(n, np.int64)
        self.ended = np.zeros(n, bool)
        self.path, self.decisions = np.zeros(n), np.zeros(n, np.int64)
        self.trails: list[list] = [[] for _ in range(n)]

    def _place(self, envs: np.ndarray, idx: np.ndarray) -> None:
        s = self.scen
        self.scenario[envs] = idx
        self.pos[envs], self.heading[envs] = s["start"][idx, :2], s["start"][idx, 2]
        self.goal[envs] = s["goal"][idx]
        self.obs_pos[envs], self.obs_vel[envs], self.obs_r[envs] = s["obs_pos"][idx], s["obs_vel"][idx], s["obs_r"][idx]
        self.v[envs] = self.w[envs] = self.t[envs] = self.path[envs] = 0.0
        self.decisions[envs] = 0
        self.ended[envs] = False
        for e in envs:
            self.trails[e] = [self.pos[e].copy()] if self.record else []

    def _observe(self) -> tuple[np.ndarray, np.ndarray]:
        scan = lidar(self.cfg, self.pos, self.heading, self.obs_pos, self.obs_r)
        return observe(self.cfg, scan, self.pos, self.heading, self.goal, self.v, self.w), scan

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        envs = np.arange(self.num_envs)
        idx = np.asarray(options["scenarios"]) if options and "scenarios" in options else \
            self.rng.integers(len(self.scen["start"]), size=self.num_envs)
        if len(idx) != self.num_envs:
            raise ValueError(f"{len(idx)} scenarios for {self.num_envs} environments")
        self._place(envs, idx)
        obs, scan = self._observe()
        return obs, {"scan": scan}

    def step(self, actions):
        cfg, n = self.cfg, self.num_envs
        v, w, ticks = decode_action(cfg, actions)
        live = ~self.ended
        self.v, self.w = np.where(live, v, self.v), np.where(live, w, self.w)
        self.decisions += live
        r_sum, r_disc, k = np.zeros(n), np.zeros(n), np.zeros(n, np.int64)
        arrived, collided, timeout = np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, bool)
        dist = np.linalg.norm(self.goal - self.pos, axis=1)
        for j in range(int(ticks[live].max()) if live.any() else 0):
            act = live & (j < ticks) & ~(arrived | collided | timeout)
            if not act.any():
                break
            a = act[:, None]
            step = np.stack([np.cos(self.heading), np.sin(self.heading)], 1) * (self.v * cfg.tick)[:, None]
            self.pos = np.where(a, self.pos + step, self.pos)
            self.path += np.where(act, self.v * cfg.tick, 0.0)
            self.heading = np.where(act, (self.heading + self.w * cfg.tick + np.pi) % (2 * np.pi) - np.pi, self.heading)
            moved = self.obs_pos + self.obs_vel * cfg.tick
            lo, hi = self.obs_r, cfg.world - self.obs_r
            bounce = (moved < lo[..., None]) | (moved > hi[..., None])
            vel = np.where(bounce, -self.obs_vel, self.obs_vel)
            self.obs_pos = np.where(a[..., None], np.clip(moved, lo[..., None], hi[..., None]), self.obs_pos)
            self.obs_vel = np.where(a[..., None], vel, self.obs_vel)
            self.t += np.where(act, cfg.tick, 0.0)
            k += act
            gap = np.linalg.norm(self.pos[:, None] - self.obs_pos, axis=-1) - self.obs_r - cfg.robot_radius
            hit_obs = ((gap < 0) & (self.obs_r > 0)).any(1)
            hit_wall = ((self.pos < cfg.robot_radius) | (self.pos > cfg.world - cfg.robot_radius)).any(1)
            new_dist = np.linalg.norm(self.goal - self.pos, axis=1)
            arr = act & (new_dist < cfg.goal_tolerance)
            col = act & ~arr & (hit_obs | hit_wall)
            out = act & ~arr & ~col & (self.t >= cfg.max_time - 1e-9)
            r = cfg.progress_reward * (dist - new_dist) - cfg.time_penalty * cfg.tick \
                + cfg.arrive_reward * arr + cfg.collision_reward * col
            r_sum += np.where(act, r, 0.0)
            r_disc += np.where(act, self.gamma ** (j * cfg.tick) * r, 0.0)
            dist = np.where(act, new_dist, dist)
            arrived |= arr
            collided |= col
            timeout |= out
            if self.record:
                for e in np.flatnonzero(act):
                    self.trails[e].append(self.pos[e].copy())
        terminated, truncated = arrived | collided, timeout
        done = terminated | truncated
        info = {"reward_disc": r_disc, "duration": k * cfg.tick, "ticks": k, "arrived": arrived, "collided": collided,
                "timeout": timeout, "done": done, "live": live, "time": self.t.copy(), "path": self.path.copy(),
                "episode_decisions": self.decisions.copy(), "scenario": self.scenario.copy()}
        self.ended |= done
        if self.autoreset and done.any():
            ended = np.flatnonzero(done)
            self._place(ended, self.rng.integers(len(self.scen["start"]), size=len(ended)))
        obs, scan = self._observe()
        info["scan"] = scan
        return obs, r_sum.astype(np.float32), terminated, truncated, info
