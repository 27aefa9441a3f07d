"""Run by torchrun in tests/test_smdp_nav.py: a short adaptive SMDP DPPO run on 2 processes, each with its own
environments. Every rank records a digest of its weights and optimizer state and its first rollout's actions."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from distillery.models.training import make_fabric
from distillery.papers.smdp_nav import NavConfig
from distillery.papers.smdp_nav import scenarios as S
from distillery.papers.smdp_nav import train as nav_train
from distillery.rl.ppo import PPOConfig


def digest(tensors) -> str:
    return hashlib.sha256(b"".join(t.detach().cpu().numpy().tobytes() for t in tensors)).hexdigest()


out = Path(sys.argv[1])
fabric = make_fabric()
record: dict = {}
original = nav_train.resumable_loop


def recording(name, model, opt, steps, *args, **kwargs):
    metrics = original(name, model, opt, steps, *args, **kwargs)
    moments = [v for s in opt.state_dict()["state"].values() for v in s.values() if torch.is_tensor(v)]
    record.update(weights=digest(model.state_dict().values()), optimizer=digest(moments), steps=steps)
    return metrics


nav_train.resumable_loop = recording
cfg = NavConfig()
arrays = S.generate(4, seed=0, cfg=cfg)
metrics = nav_train.train_policy(arrays, out / "model", cfg, PPOConfig(num_envs=4, hidden=16), variant="smdp",
                                 sim_budget_s=240.0, rollout_s=10.0, seed=0)
(out / f"rank{fabric.global_rank}.json").write_text(json.dumps({"world_size": fabric.world_size, **record,
                                                                  "sim_seconds": metrics["sim_seconds"]}))
