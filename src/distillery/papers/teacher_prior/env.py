"""Walker2d-v5 (gymnasium, MuJoCo) on rough terrain with domain randomization, batched over N environments.

The floor of Walker2d-v5's XML is replaced by a heightfield strip along x (the walker is planar), refilled at every
reset from the episode's terrain seed: smooth bumps of up to `terrain_height` metres after a flat start. Each episode
also draws a friction scale (every geom), a mass scale (every body, inertia with it), a motor strength scale (every
actuator's gear), a commanded forward velocity, and pushes: horizontal forces on the torso at random times.

Observations are split by construction (`observe` is the only place they are built):
  proprio     (14)  joint angles (6), joint velocities (6), torso pitch, pitch rate; with Gaussian noise for the
                    student and the discriminator (std = obs_noise x NOISE_SCALE), clean for the teacher
  frame       (21)  noisy proprio + last action (6) + commanded velocity (1)
  student     (H*21) the last H frames, oldest first: the student's policy input, nothing else
  privileged  (K+9) terrain heights at K points ahead (relative to the ground under the torso), base velocity
                    (vx, vz), torso height above the ground, foot contacts (2), friction, mass and motor scales,
                    the push force acting now
  teacher     (21+K+9) clean proprio + last action + command + privileged
  aux         (8)   what the student's auxiliary head predicts: vx, vz, height, contacts, friction, mass, motor scale

The task reward (`task_reward`), the same for the teacher and every student, per control step:

    r_task = 0.5 1[alive] + exp(-(vx - v_cmd)^2 / 0.25) + 0.5 min(vx, v_cmd) / v_cmd - 1e-3 |a|^2

a velocity-tracking kernel of width sigma = 0.25 (m/s)^2 (legged_gym's; half the 0.5-1.5 m/s command range, squared),
a forward-progress term paid up to the command (a gradient towards walking where the kernel is flat, nothing for
overshooting) and a small alive bonus: walking at the command earns 2.0 per step, standing still 0.57 on average over
the commands (0.87 at the slowest, 0.5 above 1 m/s). An episode ends with a fall (torso height above the ground
outside (0.8, 2.0) m or |pitch| >= 1 rad) or is cut at `episode_steps` (a time-out, bootstrapped).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

PROPRIO = 14
ACT = 6
FRAME = PROPRIO + ACT + 1
AUX = 8
AUX_NAMES = ("vx", "vz", "height", "contact_right", "contact_left", "friction", "mass", "motor")
# Noise std per proprio feature at obs_noise = 1: angles in rad, velocities in rad/s.
NOISE_SCALE = np.array([0.05] * 6 + [0.5] * 6 + [0.05, 0.5])
HFIELD_COLS, HFIELD_SPACING = 400, 0.1  # 40 m of terrain from x = -2 m
FLAT_START = 2.0  # metres of flat ground before the bumps
ALIVE_BONUS = 0.5  # per step upright (it was 1: standing still earned 1.4 of at most 2, a local optimum)
TRACK_SIGMA = 0.25  # (m/s)^2, the tracking kernel's width
PROGRESS_WEIGHT = 0.5  # forward progress, paid up to the command
ACTION_COST = 1e-3


def task_reward(alive, vx, command, action):
    """r_task = ALIVE_BONUS 1[alive] + exp(-(vx - v_cmd)^2 / TRACK_SIGMA) + PROGRESS_WEIGHT min(vx, v_cmd) / v_cmd
    - ACTION_COST |a|^2 (the module docstring); arrays broadcast, the action's last axis is summed."""
    vx, command, action = (np.asarray(x, np.float64) for x in (vx, command, action))
    return (ALIVE_BONUS * np.asarray(alive, np.float64) + np.exp(-(vx - command) ** 2 / TRACK_SIGMA)
            + PROGRESS_WEIGHT * np.minimum(vx, command) / command - ACTION_COST * (action ** 2).sum(-1))


@dataclass(frozen=True)
class TerrainConfig:
    episode_steps: int = 500  # control steps per episode (0.008 s each)
    terrain_height: float = 0.05  # largest bump (m)
    terrain_scale: float = 1.0  # horizontal length of the bumps (m)
    friction: tuple[float, float] = (0.6, 1.4)  # scale ranges, drawn per episode
    mass: tuple[float, float] = (0.8, 1.2)
    motor: tuple[float, float] = (0.8, 1.2)
    push_force: float = 40.0  # largest horizontal push on the torso (N)
    push_prob: float = 0.01  # chance per control step that a push starts
    push_steps: int = 10  # control steps a push lasts
    command: tuple[float, float] = (0.5, 1.5)  # commanded forward velocity (m/s)
    obs_noise: float = 1.0  # multiplier of NOISE_SCALE for the student's proprioception
    history: int = 3  # frames in the student's observation
    heights_ahead: int = 8  # terrain samples the teacher sees, every 0.2 m from the torso

    def check(self) -> "TerrainConfig":
        problems = []
        for name in ("friction", "mass", "motor", "command"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi or (name != "command" and lo <= 0):
                problems.append(f"{name} range must be 0 < lo <= hi, got {(lo, hi)}")
        if self.episode_steps < 2 or self.history < 1 or self.heights_ahead < 1 or self.push_steps < 1:
            problems.append("need episode_steps >= 2, history >= 1, heights_ahead >= 1 and push_steps >= 1")
        if not 0 <= self.terrain_height <= 0.3 or self.terrain_scale <= 0:
            problems.append(f"terrain_height must be in [0, 0.3] m and terrain_scale > 0, got {self.terrain_height}, "
                            f"{self.terrain_scale}")
        if self.obs_noise < 0 or self.push_force < 0 or not 0 <= self.push_prob <= 1:
            problems.append("need obs_noise >= 0, push_force >= 0 and push_prob in [0, 1]")
        if problems:
            raise ValueError("invalid TerrainConfig: " + "; ".join(problems))
        return self

    @property
    def student_dim(self) -> int:
        return self.history * FRAME

    @property
    def privileged_dim(self) -> int:
        return self.heights_ahead + 9

    @property
    def teacher_dim(self) -> int:
        return FRAME + self.privileged_dim

    def widened(self, factor: float) -> "TerrainConfig":
        """Randomization ranges `factor` times wider around their centres (evaluation beyond training)."""
        def wide(r, floor=0.05):
            c, h = (r[0] + r[1]) / 2, (r[1] - r[0]) / 2 * factor
            return (max(floor, c - h), c + h)
        return replace(self, friction=wide(self.friction), mass=wide(self.mass), motor=wide(self.motor),
                       push_force=self.push_force * factor, terrain_height=min(0.3, self.terrain_height * factor))

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TerrainConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _xml() -> Path:
    """Walker2d-v5's XML with its floor plane replaced by a heightfield strip (written once per process)."""
    import gymnasium.envs.mujoco as gm

    src = (Path(gm.__file__).parent / "assets" / "walker2d_v5.xml").read_text()
    half = HFIELD_COLS * HFIELD_SPACING / 2
    floor = ('<geom conaffinity="1" condim="3" name="floor" pos="0 0 0" rgba="0.8 0.9 0.8 1" size="40 40 40" '
             'type="plane" material="MatPlane"/>')
    if floor not in src:
        raise RuntimeError("gymnasium's walker2d_v5.xml changed: its floor geom was not found")
    out = src.replace(floor, f'<geom conaffinity="1" condim="3" name="floor" type="hfield" hfield="terrain" '
                             f'pos="{half - 2.0} 0 0" rgba="0.8 0.9 0.8 1"/>')
    out = out.replace("<asset>", f'<asset>\n<hfield name="terrain" nrow="3" ncol="{HFIELD_COLS}" '
                                 f'size="{half} 1 0.3 0.1"/>', 1)
    path = Path(tempfile.gettempdir()) / "distillery-walker2d-terrain.xml"
    if not path.exists() or path.read_text() != out:
        # Parallel workers share the temp folder: write aside, then rename (atomic), so none reads half a file.
        part = path.with_suffix(f".{os.getpid()}.part")
        part.write_text(out)
        os.replace(part, path)
    return path


def terrain_profile(cfg: TerrainConfig, seed: int) -> np.ndarray:
    """Heights (m) of the HFIELD_COLS columns: smoothed noise in [0, terrain_height], flat for the first metres."""
    rng = np.random.default_rng(seed)
    x = -2.0 + np.arange(HFIELD_COLS) * HFIELD_SPACING
    raw = rng.random(HFIELD_COLS + 40)
    width = max(1, int(round(cfg.terrain_scale / HFIELD_SPACING)))
    smooth = np.convolve(raw, np.hanning(2 * width + 1) / np.hanning(2 * width + 1).sum(), "same")[20:-20]
    smooth = (smooth - smooth.min()) / max(np.ptp(smooth), 1e-9)
    ramp = np.clip((x - FLAT_START) / 1.0, 0.0, 1.0)
    return cfg.terrain_height * smooth * ramp


class TerrainWalker:
    """One Walker2d-v5 on a heightfield; `reset(terrain_seed, rng)` draws the episode, `step(action)` applies
    pushes and motor strength and returns the raw state the batched env turns into observations."""

    def __init__(self, cfg: TerrainConfig):
        import mujoco
        from gymnasium.envs.mujoco.walker2d_v5 import Walker2dEnv

        self.cfg = cfg
        self.env = Walker2dEnv(xml_file=str(_xml()), terminate_when_unhealthy=False)
        m = self.env.model
        self.model, self.data = m, self.env.data
        self.hfield = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_HFIELD, "terrain")
        self.floor = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_GEOM, "floor")
        self.feet = [mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_GEOM, g) for g in ("foot_geom", "foot_left_geom")]
        self.torso = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_BODY, "torso")
        self.nominal = {"friction": m.geom_friction[:, 0].copy(), "mass": m.body_mass.copy(),
                        "inertia": m.body_inertia.copy(), "gear": m.actuator_gear[:, 0].copy()}
        self.heights = np.zeros(HFIELD_COLS)
        self.params = np.ones(3)
        self.push, self.push_left, self.command = 0.0, 0, 1.0

    def ground(self, x) -> np.ndarray:
        return np.interp(x, -2.0 + np.arange(HFIELD_COLS) * HFIELD_SPACING, self.heights)

    def reset(self, cfg: TerrainConfig, terrain_seed: int, rng: np.random.Generator) -> None:
        m = self.model
        self.cfg = cfg
        self.heights = terrain_profile(cfg, terrain_seed)
        m.hfield_data[:] = np.tile(self.heights / 0.3, 3)  # elevation 0.3 m in the XML's size
        f, ms, mo = (rng.uniform(*r) for r in (cfg.friction, cfg.mass, cfg.motor))
        m.geom_friction[:, 0] = self.nominal["friction"] * f
        m.body_mass[:] = self.nominal["mass"] * ms
        m.body_inertia[:] = self.nominal["inertia"] * ms
        m.actuator_gear[:, 0] = self.nominal["gear"] * mo
        self.params = np.array([f, ms, mo])
        self.command = float(rng.uniform(*cfg.command))
        self.push, self.push_left = 0.0, 0
        self.env.reset(seed=int(rng.integers(2**31)))
        self.data.xfrc_applied[:] = 0.0

    def step(self, action: np.ndarray, rng: np.random.Generator) -> float:
        """One control step; returns the forward velocity."""
        cfg = self.cfg
        if self.push_left == 0 and cfg.push_force > 0 and rng.random() < cfg.push_prob:
            self.push, self.push_left = float(rng.uniform(-1, 1) * cfg.push_force), cfg.push_steps
        self.data.xfrc_applied[self.torso, 0] = self.push if self.push_left else 0.0
        _, _, _, _, info = self.env.step(np.clip(action, -1.0, 1.0))
        if self.push_left:
            self.push_left -= 1
        return float(info["x_velocity"])

    def contacts(self) -> np.ndarray:
        d, out = self.data, np.zeros(2)
        for i in range(d.ncon):
            c = d.contact[i]
            for k, foot in enumerate(self.feet):
                if {c.geom1, c.geom2} == {foot, self.floor}:
                    out[k] = 1.0
        return out

    def state(self) -> dict:
        q, v = self.data.qpos, np.clip(self.data.qvel, -10, 10)
        x = float(q[0])
        return {"x": x, "height": float(q[1] - self.ground(x)), "pitch": float(q[2]),
                "proprio": np.concatenate([q[3:9], v[3:9], [q[2], v[2]]]), "vel": v[:2].copy()}


def observe(cfg: TerrainConfig, w: TerrainWalker, s: dict, last_action: np.ndarray,
            noise: np.ndarray) -> dict[str, np.ndarray]:
    """The observation split (see the module docstring) of one walker: noisy proprio frame, privileged, aux."""
    noisy = s["proprio"] + noise
    frame = np.concatenate([noisy, last_action, [w.command]])
    ahead = w.ground(s["x"] + 0.2 * np.arange(1, cfg.heights_ahead + 1)) - w.ground(s["x"])
    contacts = w.contacts()
    privileged = np.concatenate([ahead, s["vel"], [s["height"]], contacts, w.params,
                                 [w.push / max(cfg.push_force, 1.0) if w.push_left else 0.0]])
    teacher = np.concatenate([s["proprio"], last_action, [w.command], privileged])
    aux = np.concatenate([s["vel"], [s["height"]], contacts, w.params])
    return {"proprio": noisy, "frame": frame, "privileged": privileged, "teacher": teacher, "aux": aux}


class TerrainVecEnv:
    """N TerrainWalkers stepped in turn, with autoreset. Terrain seeds are drawn from `terrain_seeds` (a range of
    ints: training and evaluation use disjoint ranges). `step` returns (obs, r_task, terminated, truncated, info);
    obs is a dict of (N, dim) arrays "student", "teacher", "proprio", "privileged", "aux"; info carries "final"
    (the observation dict an ended episode finished in), "x_velocity", "distance", "episode_return", "fell"."""

    def __init__(self, cfg: TerrainConfig, num_envs: int, seed: int = 0, terrain_seeds: tuple[int, int] = (0, 10_000),
                 obs_noise: float | None = None):
        self.cfg = cfg.check()
        self.num_envs = num_envs
        self.noise = cfg.obs_noise if obs_noise is None else obs_noise
        self.rng = np.random.default_rng(seed)
        self.terrain_seeds = terrain_seeds
        self.walkers = [TerrainWalker(cfg) for _ in range(num_envs)]
        n = num_envs
        self.history = np.zeros((n, cfg.history, FRAME))
        self.last_action = np.zeros((n, ACT))
        self.t, self.ret, self.x0 = np.zeros(n, np.int64), np.zeros(n), np.zeros(n)
        self.episode_seed = np.zeros(n, np.int64)

    def _draw(self, i: int, terrain_seed: int | None = None) -> None:
        seed = int(self.rng.integers(*self.terrain_seeds)) if terrain_seed is None else int(terrain_seed)
        self.walkers[i].reset(self.cfg, seed, self.rng)
        self.episode_seed[i] = seed
        self.t[i], self.ret[i], self.last_action[i] = 0, 0.0, 0.0
        self.x0[i] = self.walkers[i].state()["x"]

    def _obs(self, i: int) -> dict:
        o = observe(self.cfg, self.walkers[i], self.walkers[i].state(), self.last_action[i],
                    self.rng.normal(size=PROPRIO) * NOISE_SCALE * self.noise)
        return o

    def _stack(self, per_env: list[dict]) -> dict[str, np.ndarray]:
        out = {k: np.stack([o[k] for o in per_env]).astype(np.float32) for k in ("proprio", "privileged", "teacher",
                                                                                 "aux")}
        out["student"] = self.history.reshape(self.num_envs, -1).astype(np.float32)
        return out

    def reset(self, terrain_seeds: list[int] | None = None) -> dict[str, np.ndarray]:
        per_env = []
        for i in range(self.num_envs):
            self._draw(i, None if terrain_seeds is None else terrain_seeds[i])
            o = self._obs(i)
            self.history[i] = o["frame"]  # a fresh episode's history is its first frame repeated
            per_env.append(o)
        return self._stack(per_env)

    def step(self, actions: np.ndarray):
        actions = np.clip(np.asarray(actions, np.float64), -1.0, 1.0)
        n = self.num_envs
        r = np.zeros(n)
        term, trunc = np.zeros(n, bool), np.zeros(n, bool)
        vx, dist, ep_ret, fell, cmd = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n, bool), np.zeros(n)
        per_env, finals = [], [None] * n
        for i, w in enumerate(self.walkers):
            vx[i], cmd[i] = w.step(actions[i], self.rng), w.command
            s = w.state()
            alive = 0.8 < s["height"] < 2.0 and abs(s["pitch"]) < 1.0
            r[i] = task_reward(alive, vx[i], w.command, actions[i])
            self.last_action[i] = actions[i]
            self.t[i] += 1
            self.ret[i] += r[i]
            term[i], trunc[i] = not alive, alive and self.t[i] >= self.cfg.episode_steps
            o = self._obs(i)
            self.history[i] = np.concatenate([self.history[i, 1:], o["frame"][None]])
            if term[i] or trunc[i]:
                o["student"] = self.history[i].reshape(-1)
                finals[i] = o
                dist[i], ep_ret[i], fell[i] = s["x"] - self.x0[i], self.ret[i], term[i]
                self._draw(i)
                o = self._obs(i)
                self.history[i] = o["frame"]
            per_env.append(o)
        info = {"final": finals, "x_velocity": vx, "distance": dist, "episode_return": ep_ret, "fell": fell,
                "command": cmd}
        return self._stack(per_env), r.astype(np.float32), term, trunc, info
