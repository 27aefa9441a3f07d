"""A saved navigation policy: `model.safetensors` (actor-critic weights) + `policy.json` (kind "navigation", the
NavConfig it was trained with, network size, variant). Acts deterministically (the Gaussian's mean)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from distillery.models.files import share_readable
from distillery.papers.smdp_nav.env import NavConfig, decode_action, observe
from distillery.rl.ppo import ActorCritic


def save_policy(out: Path, net: ActorCritic, nav: NavConfig, *, variant: str, gamma: float) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, out / "model.safetensors")
    hidden = net.actor[0].out_features
    (out / "policy.json").write_text(json.dumps({"kind": "navigation", "nav_config": nav.as_dict(), "hidden": hidden,
                                                 "variant": variant, "gamma": gamma}))
    share_readable(out)


class NavPolicy:
    def __init__(self, path: Path):
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / "policy.json").exists():
            raise FileNotFoundError(f"{path} is not a saved navigation policy (policy.json missing)")
        meta = json.loads((path / "policy.json").read_text())
        if meta.get("kind") != "navigation":
            raise ValueError(f"{path} holds a {meta.get('kind')!r} policy, not a navigation policy")
        self.cfg = NavConfig(**meta["nav_config"])
        self.variant = meta["variant"]
        self.net = ActorCritic(self.cfg.obs_dim, self.cfg.act_dim, meta["hidden"])
        self.net.load_state_dict(load_file(path / "model.safetensors"))
        self.net.eval()

    @property
    def name(self) -> str:
        return f"fixed-{self.cfg.fixed_tau:g}s" if self.cfg.fixed_tau else f"adaptive-{self.variant}"

    @torch.no_grad()
    def act(self, obs: np.ndarray) -> np.ndarray:
        """Observations (B, obs_dim) as NavVecEnv builds them -> actions in [-1, 1]^act_dim."""
        return self.net.act_deterministic(torch.as_tensor(np.asarray(obs), dtype=torch.float32)).numpy()

    def command(self, scan, goal_distance, goal_bearing, v, w) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw sensor values (B, beams) ranges in metres, goal distance (m) and bearing (rad, robot frame),
        current v (m/s) and w (rad/s) -> v, w, duration (s) to hold them."""
        scan = np.minimum(np.asarray(scan, np.float64), self.cfg.lidar_range)
        d, b = np.asarray(goal_distance, np.float64), np.asarray(goal_bearing, np.float64)
        zeros = np.zeros((len(scan), 2))
        goal = np.stack([d * np.cos(b), d * np.sin(b)], 1)  # robot at the origin, heading 0
        obs = observe(self.cfg, scan, zeros, np.zeros(len(scan)), goal, np.asarray(v, np.float64),
                      np.asarray(w, np.float64))
        v_out, w_out, ticks = decode_action(self.cfg, self.act(obs))
        return v_out, w_out, ticks * self.cfg.tick
