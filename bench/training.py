"""CPU training throughput of the `cpu` profile's tiny-sd UNet (32 px, batch 32 per process): 2 DDP processes
(gloo, 1 thread each) against 1 process (2 threads), measured in one run on the same data and VAE.

Both use the machine's cores; DDP trains on twice the samples per step (each rank its own batch of 32), so
samples/s is the number to compare, steps/s shows what the gradient all-reduce costs per step. The loop's own
timing (`unet_steps_per_s`, from the first step to the last) leaves out process start and data encoding. On a
machine shared with other jobs the single process's 2 OpenMP threads suffer most from the load (they spin against
other processes); the load average is saved with the results: read the ratio with it.

    python bench/training.py [--steps 12]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
BATCH = 32


def worker(root: Path, steps: int) -> None:
    """One training run (a process, or every rank under torchrun); rank 0 writes its metrics."""
    from distillery.data import load_image_caption_dataset
    from distillery.models import tiny_sd
    from distillery.models.training import make_fabric

    fabric = make_fabric()
    out = root / f"unet-{fabric.world_size}"
    metrics = tiny_sd.train_unet(load_image_caption_dataset(root / "ds").train(), root / "vae", out,
                                 cfg=tiny_sd.TinySDConfig(resolution=32), steps=steps, batch_size=BATCH,
                                 log_every=max(1, steps // 2))
    if fabric.is_global_zero:
        (root / f"metrics-{fabric.world_size}.json").write_text(json.dumps({**metrics,
                                                                          "world_size": fabric.world_size}))


def run(processes: int, root: Path, steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILLERY_")}
    env.update(DISTILLERY_HOME=str(root / "home"), DISTILLERY_ACCELERATOR="cpu", DISTILLERY_DEVICES=str(processes),
               DISTILLERY_CPU_THREADS=str(max(1, (os.cpu_count() or 2) // processes)))
    args = [__file__, "--worker", str(root), "--steps", str(steps)]
    if processes > 1:
        torchrun = str(Path(sys.executable).parent / "torchrun")
        cmd = [torchrun, f"--nproc_per_node={processes}", "--master_addr=127.0.0.1", "--master_port=29611", *args]
    else:
        cmd = [sys.executable, *args]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads((root / f"metrics-{processes}.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.worker:
        return worker(a.worker, a.steps)

    from _common import RESULTS, report

    from distillery.data import build_image_caption_dataset
    from distillery.models import tiny_sd

    root = RESULTS / "homes" / "training"
    build_image_caption_dataset(root / "ds", sources=("mnist",), resolution=32, per_class=60)
    vae = tiny_sd.build_vae(tiny_sd.TinySDConfig(resolution=32))  # untrained: UNet speed does not depend on it
    vae.register_to_config(scaling_factor=1.0)
    vae.save_pretrained(root / "vae")
    one, ddp = run(1, root, a.steps), run(2, root, a.steps)
    rows = [("steps/s", ddp["unet_steps_per_s"], one["unet_steps_per_s"], "steps/s"),
            ("samples/s", 2 * BATCH * ddp["unet_steps_per_s"], BATCH * one["unet_steps_per_s"], "samples/s")]
    report("training", rows, {"ours": "2 DDP processes (gloo, 1 thread each)", "baseline": "1 process (2 threads)",
                              "steps": a.steps, "batch_per_process": BATCH, "loadavg": os.getloadavg()})


if __name__ == "__main__":
    main()
