"""Resumable training loops shared by the model families: every `checkpoint_every` steps the model, optimizer,
step and random state go to `checkpoint_dir` (safetensors for weights, weights-only torch.load for the rest);
started again with the same folder a loop continues from there and ends with the same weights an uninterrupted
run would have."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

LogFn = Callable[[dict, int], None]



def _save_checkpoint(ckpt: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int,
                     gen: torch.Generator, fingerprint: str, loss: float) -> None:
    import shutil

    from safetensors.torch import save_file

    tmp, last, prev = ckpt / "tmp", ckpt / "last", ckpt / "prev"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    torch.save({"optimizer": opt.state_dict(), "step": step, "generator": gen.get_state(),
                "fingerprint": fingerprint, "loss": loss}, tmp / "state.pt")
    # Two renames, so a crash at any point leaves a complete checkpoint in `last` or `prev`.
    shutil.rmtree(prev, ignore_errors=True)
    if last.exists():
        last.rename(prev)
    tmp.rename(last)
    shutil.rmtree(prev, ignore_errors=True)


def _load_checkpoint(ckpt: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
                     fingerprint: str) -> tuple[int, float]:
    """(step, loss at that step) of the newest complete checkpoint, or (0, nan) when there is none."""
    from safetensors.torch import load_file

    found = [d for d in (ckpt / "last", ckpt / "prev")
             if (d / "state.pt").exists() and (d / "model.safetensors").exists()]
    if not found:
        return 0, float("nan")
    state = torch.load(found[0] / "state.pt", weights_only=True)
    if state.get("fingerprint") != fingerprint:
        raise ValueError(f"the checkpoint in {ckpt} was written by a run with other settings "
                         f"({state.get('fingerprint')} vs {fingerprint}); delete that folder or pass another "
                         f"checkpoint_dir")
    model.load_state_dict(load_file(found[0] / "model.safetensors"))
    opt.load_state_dict(state["optimizer"])
    gen.set_state(state["generator"])
    return int(state["step"]), float(state.get("loss", float("nan")))


def resumable_loop(name: str, model, opt, steps: int, checkpoint_dir: Path | None, checkpoint_every: int, gen,
          step_fn: Callable[[int], dict], on_log: LogFn | None, log_every: int, fingerprint: dict) -> dict:
    key = json.dumps({"loop": name, **fingerprint}, sort_keys=True, default=str)
    start, last_loss = 0, float("nan")
    if checkpoint_dir:
        start, last_loss = _load_checkpoint(Path(checkpoint_dir), model, opt, gen, key)
    if start > steps:
        raise ValueError(f"the checkpoint in {checkpoint_dir} is at step {start}, past the requested {steps} steps; "
                         f"ask for at least {start} steps or use another checkpoint_dir")
    model.train()
    t0, losses = time.perf_counter(), []
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=name, mininterval=2.0)
    for step in bar:
        losses.append(step_fn(step)["loss"])
        if not np.isfinite(losses[-1]):
            raise FloatingPointError(f"{name} loss became {losses[-1]} at step {step + 1}; lower the learning rate")
        recent = float(np.mean(losses[-log_every:]))
        if (step + 1) % log_every == 0 or step + 1 == steps:
            bar.set_postfix(loss=f"{recent:.4f}")
            if on_log:
                on_log({f"{name}_loss": recent}, step + 1)
        if checkpoint_dir and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
            _save_checkpoint(Path(checkpoint_dir), model, opt, step + 1, gen, key, recent)
    model.eval()
    seconds = time.perf_counter() - t0
    return {"resumed_from_step": start,
            f"{name}_final_loss": float(np.mean(losses[-log_every:])) if losses else last_loss,
            f"{name}_steps_per_s": (steps - start) / seconds if steps > start else 0.0}
