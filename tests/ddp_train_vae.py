"""Run by torchrun in tests/test_training.py: trains the smoke VAE with DDP once per `folder:steps` argument (in
one process group) and records what each rank ended with."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

from distillery.models import tiny_sd
from distillery.models.training import make_fabric

fabric = make_fabric()
rng = np.random.default_rng(0)
data = type("D", (), {"images": rng.integers(0, 255, (16, 16, 16, 3), dtype=np.uint8)})()
cfg = tiny_sd.TinySDConfig(resolution=16, vae_channels=(8, 16, 16), vae_norm_groups=4, unet_channels=(16, 32),
                           norm_groups=8)
build_vae, randint = tiny_sd.build_vae, torch.randint

for arg in sys.argv[1:]:
    folder, steps = arg.rsplit(":", 1)
    out, steps = Path(folder), int(steps)
    built, first = [], []

    def log(metrics: dict, step: int, out=out) -> None:
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps({"rank": fabric.global_rank, "step": step, **metrics}) + "\n")

    def first_batch(*args, generator=None, **kw):
        idx = randint(*args, generator=generator, **kw)
        if not first and generator is not None:
            first.append(idx.tolist())
        return idx

    tiny_sd.build_vae = lambda c: built.append(build_vae(c)) or built[-1]
    torch.randint = first_batch
    metrics = tiny_sd.train_vae(data, out / "vae", cfg=cfg, steps=steps, batch_size=4, seed=0,
                                checkpoint_dir=out / "ckpt", checkpoint_every=2, log_every=2, on_log=log)
    torch.randint = randint
    digest = hashlib.sha256(b"".join(v.detach().cpu().numpy().tobytes() for v in built[0].state_dict().values()))
    (out / f"rank{fabric.global_rank}-{steps}.json").write_text(json.dumps({
        "world_size": fabric.world_size, "weights": digest.hexdigest(), "first_batch": first[0] if first else None,
        "resumed_from_step": metrics["resumed_from_step"]}))
