"""One training harness for every model family, on Lightning Fabric.

`make_fabric` turns the settings (accelerator, devices, strategy, precision, CPU threads) into a launched Fabric:
CPU, one GPU, or several processes with DDP in one pod (gloo on CPU, NCCL on GPUs). `resumable_loop` runs a
loop's `step_fn` with progress bar, logging and Lightning checkpoints (`fabric.save`/`fabric.load` of
`last.ckpt`, on a local folder or `s3://`): model, optimizer, step, the sampling generator and the global random
states of every rank, plus a fingerprint of the config. Started again with the same folder a loop continues from
there and ends with the weights an uninterrupted run would have. Only rank 0 writes files and logs.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

LogFn = Callable[[dict, int], None]

PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "64-true")
_fabrics: dict = {}


def resolve_accelerator(accelerator: str) -> str:
    if accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"accelerator={accelerator!r} but this machine has no CUDA GPU visible to torch; "
                             f"set DISTILLERY_ACCELERATOR=auto or cpu")
        return "cuda"
    if accelerator != "cpu":
        raise ValueError(f"accelerator must be auto, cpu, gpu or cuda, got {accelerator!r}")
    return "cpu"


def resolve_precision(precision: str, accelerator: str) -> str:
    """Lightning precision for a resolved accelerator: "auto" is bf16-mixed on a GPU with bf16, else 32-true."""
    on_gpu = accelerator == "cuda"
    if precision == "auto":
        return "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"
    if precision in ("16-mixed", "16-true"):
        raise ValueError(f"precision {precision!r} (fp16) is refused: without loss scaling fp16 gradients under- and "
                         f"overflow, and the loops clip gradients and update EMA targets outside a GradScaler; use "
                         f"bf16-mixed on a GPU that supports it (Ampere or newer) or 32-true")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be auto or one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision.startswith("bf16") and on_gpu and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision {precision!r} but this GPU has no bf16; use 32-true (or precision=auto)")
    return precision


def cpu_limit(cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """CPUs this process may use when something limits it below the machine: a pod's CPU limit (the cgroup v2
    quota, rounded up) or the affinity mask, whichever is smaller; None when nothing does. torch sizes its thread
    pool by the node's cores, so a pod limited to 2 CPUs on a 64-core node would run 32 threads on a 2-CPU quota
    and spend most of each period throttled."""
    import os

    limits = []
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        if quota != "max":
            limits.append(max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota visible: not in a limited container
    if hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) < (os.cpu_count() or 1):
        limits.append(len(os.sched_getaffinity(0)))
    return min(limits) if limits else None


def set_cpu_threads(settings=None) -> int:
    """torch's intra-op threads for this process: the `cpu_threads` setting, else the CPU limit, else torch's
    choice. Every step calls it (platform/stepping.py), not only training. Returns the count in use."""
    from distillery.settings import get_settings

    threads = (settings or get_settings()).cpu_threads or cpu_limit()
    if threads and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def make_fabric(settings=None):
    """The launched Fabric of this process for the settings' accelerator, devices, strategy and precision
    (one per configuration, so the loops of a step share a process group).

    DDP is plain DDP (no `find_unused_parameters`): its reducer waits for a gradient of every parameter in every
    step, and every loop gives one. MoDE's routing skips experts, but each layer's experts are one stacked parameter,
    so the skipped experts get zero rows of a gradient that exists (tests/test_mode_model.py checks this); a model
    that truly left a parameter out would fail loudly at its next step, never train silently out of sync."""
    from lightning.fabric import Fabric

    from distillery.settings import get_settings

    s = settings or get_settings()
    accelerator = resolve_accelerator(s.accelerator)
    precision = resolve_precision(s.precision, accelerator)
    if s.devices < 1:
        raise ValueError(f"devices must be >= 1, got {s.devices}")
    strategy = s.strategy if s.strategy != "auto" else ("ddp" if s.devices > 1 else "auto")
    key = (accelerator, s.devices, strategy, precision)
    if key not in _fabrics:
        if accelerator == "cpu":
            set_cpu_threads(s)
        fabric = Fabric(accelerator=accelerator, devices=s.devices, strategy=strategy, precision=precision)
        fabric.launch()
        _fabrics[key] = fabric
    return _fabrics[key]


def global_rank(settings=None) -> int:
    """This process's rank among a step's training processes: 0 in one process, else the launched Fabric's."""
    from distillery.settings import get_settings

    s = settings or get_settings()
    return 0 if s.devices == 1 else make_fabric(s).global_rank


def broadcast(obj, settings=None):
    """Rank 0's `obj` on every training process (a decision all ranks must share); `obj` itself in one process."""
    from distillery.settings import get_settings

    s = settings or get_settings()
    return obj if s.devices == 1 else make_fabric(s).broadcast(obj)


def all_reduce_gradients(fabric, module: torch.nn.Module) -> None:
    """Average `module`'s gradients over the training processes, for a module that is not a DDP wrapper (one
    entered through several methods, which DDP's forward hooks would not see). Nothing to do in one process."""
    if fabric.world_size == 1:
        return
    for p in module.parameters():
        if p.grad is not None:
            p.grad = fabric.all_reduce(p.grad, reduce_op="mean")


def _storage_path(checkpoint_dir) -> str:
    path = str(checkpoint_dir).rstrip("/")
    if path.startswith("s3://"):
        import fsspec

        from distillery.settings import get_settings

        # Lightning opens checkpoint paths with fsspec; the S3 endpoint comes from the settings, credentials from
        # the standard AWS_* variables.
        s = get_settings()
        fsspec.config.conf["s3"] = {"client_kwargs": {"endpoint_url": s.s3_endpoint_url, "region_name": s.s3_region}}
    return f"{path}/last.ckpt"


def _exists(path: str) -> bool:
    import fsspec

    fs, p = fsspec.core.url_to_fs(path)
    fs.invalidate_cache()
    return fs.exists(p)


def _rng_states(fabric, gen: torch.Generator) -> dict:
    """Random states of every rank (each rank samples its own batches), gathered for rank 0 to save."""
    local = {"generator": gen.get_state(), "torch": torch.get_rng_state()}
    if fabric.device.type == "cuda":
        local["cuda"] = torch.cuda.get_rng_state(fabric.device)
    states = {k: fabric.all_gather(v.to(fabric.device)).cpu() for k, v in local.items()}
    if fabric.world_size == 1:
        states = {k: v.unsqueeze(0) for k, v in states.items()}
    np_state = np.random.get_state()
    return {**states, "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": random.getstate()}


def _set_rng_states(fabric, states: dict, gen: torch.Generator) -> None:
    if states["generator"].shape[0] != fabric.world_size:
        raise ValueError(f"the checkpoint was written by {states['generator'].shape[0]} processes, this run has "
                         f"{fabric.world_size}; resume with the same DISTILLERY_DEVICES or start a new checkpoint folder")
    rank = fabric.global_rank
    gen.set_state(states["generator"][rank].to(torch.uint8).clone())
    torch.set_rng_state(states["torch"][rank].to(torch.uint8).clone())
    if "cuda" in states and fabric.device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"][rank].to(torch.uint8).clone(), fabric.device)
    kind, keys, *rest = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


def resumable_loop(name: str, model, opt, steps: int, checkpoint_dir: Path | str | None, checkpoint_every: int, gen,
                   step_fn: Callable[[int], dict], on_log: LogFn | None, log_every: int, fingerprint: dict,
                   fabric=None) -> dict:
    """Run `step_fn(step)` (which returns {"loss": float}) from the checkpoint's step to `steps`. `model` and `opt`
    are what `fabric.setup` returned (or a module holding every trained part, and a dict of named optimizers when a
    loop steps several); `gen` is the generator the loop samples with."""
    fabric = fabric or make_fabric()
    optimizers = opt if isinstance(opt, dict) else {"optimizer": opt}
    key = json.dumps({"loop": name, "world_size": fabric.world_size, **fingerprint}, sort_keys=True, default=str)
    start, last_loss = 0, float("nan")
    path = _storage_path(checkpoint_dir) if checkpoint_dir else None
    if path and _exists(path):
        state = {"model": model, **optimizers}
        rest = fabric.load(path, state, weights_only=True)
        if rest.get("fingerprint") != key:
            raise ValueError(f"the checkpoint in {checkpoint_dir} was written by a run with other settings "
                             f"({rest.get('fingerprint')} vs {key}); delete that folder or pass another checkpoint_dir")
        _set_rng_states(fabric, rest["rng"], gen)
        start, last_loss = int(rest["step"]), float(rest.get("loss", float("nan")))
    if start > steps:
        raise ValueError(f"the checkpoint in {checkpoint_dir} is at step {start}, past the requested {steps} steps; "
                         f"ask for at least {start} steps or use another checkpoint_dir")
    model.train()
    t0, losses = time.perf_counter(), []
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=name, mininterval=2.0,
               disable=not fabric.is_global_zero)
    for step in bar:
        losses.append(step_fn(step)["loss"])
        if not np.isfinite(losses[-1]):
            raise FloatingPointError(f"{name} loss became {losses[-1]} at step {step + 1}; lower the learning rate")
        recent = float(np.mean(losses[-log_every:]))
        if (step + 1) % log_every == 0 or step + 1 == steps:
            # The mean over ranks, so the logged loss is the batch the optimizer actually stepped on.
            recent = float(fabric.all_reduce(torch.tensor(recent, device=fabric.device), reduce_op="mean"))
            bar.set_postfix(loss=f"{recent:.4f}")
            if on_log and fabric.is_global_zero:
                on_log({f"{name}_loss": recent}, step + 1)
        if path and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
            rng = _rng_states(fabric, gen)
            fabric.save(path, {"model": model, **optimizers, "step": step + 1, "rng": rng, "fingerprint": key,
                               "loss": recent})
    model.eval()
    seconds = time.perf_counter() - t0
    fabric.barrier()
    return {"resumed_from_step": start,
            f"{name}_final_loss": float(np.mean(losses[-log_every:])) if losses else last_loss,
            f"{name}_steps_per_s": (steps - start) / seconds if steps > start else 0.0}
