"""Run by torchrun in tests/test_training.py: the method loops under DDP in one process group. Arguments:
`scott:FOLDER:STEPS[:STOP]` distills a tiny teacher (SCott with the adversary), `mode:...` / `dense:...` trains a
MoDE / dense policy; with STOP every rank stops before that step (a pod killed after its last checkpoint), and the
same folder started again resumes. `register:DATASET:OUT` runs the feature-network step (trains and registers)
through `run_step`. Each training run records what every rank ended with: a digest of all trained parts and
optimizer states, the seed its batches came from, and the step it resumed from."""

from __future__ import annotations

import hashlib
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch

from distillery.models import tiny_sd
from distillery.models.training import make_fabric
from distillery.papers import scott
from distillery.papers.mode import MoDEConfig
from distillery.papers.mode import policy as mode_policy
from distillery.papers.scott import distillation


def digest(tensors) -> str:
    return hashlib.sha256(b"".join(t.detach().cpu().numpy().tobytes() for t in tensors)).hexdigest()


class Stop(Exception):
    pass


def recording(module, loop, record: dict, stop: int | None):
    """Wraps the module's `resumable_loop` so the trained parts are read on every rank once the loop is done."""

    def wrapped(name, model, opt, steps, checkpoint_dir, checkpoint_every, gen, step_fn, *args, **kwargs):
        def stopping(step: int) -> dict:
            if step == stop:
                raise Stop
            return step_fn(step)

        metrics = loop(name, model, opt, steps, checkpoint_dir, checkpoint_every, gen, stopping, *args, **kwargs)
        optimizers = opt.values() if isinstance(opt, dict) else [opt]
        moments = [v for o in optimizers for s in o.state_dict()["state"].values() for v in s.values()
                   if torch.is_tensor(v)]
        record.update(weights=digest(model.state_dict().values()), optimizer=digest(moments), seed=gen.initial_seed(),
                      resumed_from_step=metrics["resumed_from_step"])
        return metrics

    module.resumable_loop = wrapped


def teacher(folder: Path) -> Path:
    path = folder / "teacher"
    if fabric.is_global_zero and not (path / "model_index.json").exists():
        tiny_sd.build_pipeline(seed=0).save_pretrained(path)
    fabric.barrier()
    return path


def demos():
    """Synthetic demonstrations (3 tasks, 4 episodes of 12 steps): what MoDE's loop reads, without a simulator."""
    rng = np.random.default_rng(0)
    n_ep, n = 4, 12
    tasks = ["reach-v3", "push-v3", "pick-place-v3"]
    return types.SimpleNamespace(
        obs=rng.normal(size=(n_ep * n, 39)).astype(np.float32), actions=rng.uniform(-1, 1, (n_ep * n, 4)).astype(
            np.float32), start=np.arange(n_ep) * n, length=np.full(n_ep, n), task=np.arange(n_ep) % 3,
        tasks=tasks, instructions=[f"do {t}" for t in tasks], manifest={"content_sha256": "synthetic"},
        episode=lambda i: (ds.obs[i * n:(i + 1) * n], ds.actions[i * n:(i + 1) * n]))


fabric = make_fabric()
ds = demos()
loops = {"scott": distillation, "mode": mode_policy, "dense": mode_policy}
originals = {name: m.resumable_loop for name, m in loops.items()}

for arg in sys.argv[1:]:
    kind, folder, last, *stop = arg.split(":")
    out = Path(folder)
    if kind == "register":
        from distillery.platform import tracking
        from distillery.platform.stepping import run_step
        from distillery.steps import tiny_sd as tiny_sd_steps

        if fabric.is_global_zero:
            tracking.client().search_experiments()  # one process creates the sqlite store (a server on a cluster)
        fabric.barrier()
        result = run_step(tiny_sd_steps.train_feature_net, pipeline="tiny-sd", step="train-feature-net",
                          dataset_dir=str(out), out_dir=last, steps=3, seed=0)
        Path(last).parent.mkdir(parents=True, exist_ok=True)
        with open(Path(last).parent / "register.jsonl", "a") as f:
            f.write(json.dumps({"rank": fabric.global_rank, **result}) + "\n")
        continue
    steps, record = int(last), {}
    recording(loops[kind], originals[kind], record, int(stop[0]) if stop else None)

    def log(metrics: dict, step: int, out=out) -> None:
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps({"rank": fabric.global_rank, "step": step, **metrics}) + "\n")

    kw = dict(checkpoint_dir=out / "ckpt", checkpoint_every=2, log_every=2, on_log=log)
    try:
        if kind == "scott":
            images = np.random.default_rng(0).integers(0, 255, (8, 32, 32, 3), dtype=np.uint8)
            data = types.SimpleNamespace(images=images, captions=[f"a handwritten digit {i % 3}" for i in range(8)])
            cfg = scott.DistillConfig(method="scott-adv", steps=steps, batch_size=2, adv_weight=0.2)
            scott.distill(teacher(out.parent), data, out / "model", cfg, **kw)
        else:
            cfg = MoDEConfig(width=32, depth=2, heads=4, num_experts=4, top_k=2, expert_hidden=16, chunk=4,
                             obs_history=2, dense=kind == "dense")
            mode_policy.train_policy(ds, out / "model", cfg, steps=steps, batch_size=8, sampling_steps=2, **kw)
    except Stop:
        continue
    (out / f"rank{fabric.global_rank}-{steps}.json").write_text(json.dumps({"world_size": fabric.world_size,
                                                                           **record}))
