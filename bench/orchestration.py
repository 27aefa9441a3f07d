"""Orchestration overhead of the KFP local runner.

1. The tiny-sd DAG through the KFP local runner (one subprocess per step) vs the same step functions
   called one after another in this process (ratio = overhead of process-per-step orchestration).
2. A cached re-run of the DAG vs its first run (ratio = what step caching saves).
3. With --containers: the compiled DAG with every step in its own container of the built image
   (kfp.local.DockerRunner through podman, as uid 1000) vs the subprocess runner; the image size too.
   Needs `make image` (its script is run here, a no-op when the image is current).

    python bench/orchestration.py [--profile smoke] [--containers]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import fresh_home, report, timed


def in_process(args: dict) -> None:
    """The DAG's steps called directly, in the order the runner would run them (the baseline)."""
    from distillery.platform import tracking
    from distillery.platform.stepping import run_step
    from distillery.steps import data, release, tiny_sd

    tracking.configure()
    os.environ["DISTILLERY_PARENT_RUN_ID"] = tracking.start_pipeline_run("tiny-sd", args, tags={"runner": "in-process"})
    from distillery.settings import get_settings

    get_settings.cache_clear()
    t = dict(pipeline="tiny-sd", kfp_run_id="in-process")
    w = Path(tempfile.mkdtemp(prefix="inproc-"))
    run_step(data.prepare_image_captions, step="data", **t, out_dir=str(w / "ds"), sources=args["sources"],
             resolution=args["resolution"], per_class=args["per_class"], holdout_fraction=args["holdout_fraction"],
             seed=args["seed"], dataset_uri="")
    run_step(data.validate_image_captions, step="validate", **t, dataset_dir=str(w / "ds"),
             report_path=str(w / "report.html"), balance_tolerance=args["balance_tolerance"])
    run_step(tiny_sd.train_feature_net, step="feature-net", **t, dataset_dir=str(w / "ds"), out_dir=str(w / "fn"),
             steps=args["feature_steps"], seed=args["seed"])
    run_step(tiny_sd.train_vae, step="train-vae", **t, dataset_dir=str(w / "ds"), out_dir=str(w / "vae"),
             steps=args["vae_steps"], batch_size=args["vae_batch_size"], lr=args["vae_lr"], seed=args["seed"])
    run_step(tiny_sd.train_unet, step="train-unet", **t, dataset_dir=str(w / "ds"), vae_dir=str(w / "vae"),
             out_dir=str(w / "model"), steps=args["unet_steps"], batch_size=args["unet_batch_size"],
             lr=args["unet_lr"], cond_dropout=args["cond_dropout"], seed=args["seed"])
    metrics = run_step(tiny_sd.evaluate, step="evaluate", **t, model_dir=str(w / "model"), dataset_dir=str(w / "ds"),
                       feature_net_dir=str(w / "fn"), num_per_class=args["eval_per_class"], steps=args["eval_steps"],
                       guidance_scale=args["guidance_scale"], seed=args["seed"])
    decision = run_step(release.gate, step="gate", **t, metrics=metrics, model_name=args["model_name"],
                        thresholds=args["gate_thresholds"], directions={"fd": "min", "cond_acc": "max"},
                        report_path=str(w / "gate.md"))
    if decision["passed"]:
        v = run_step(release.register, step="register", **t, model_dir=str(w / "model"), metrics=metrics,
                     model_name=args["model_name"])
        run_step(release.deploy, step="deploy", **t, model_name=args["model_name"], version=v["version"],
                 kind="text-to-image", gpu=False, manifest_path=str(w / "isvc.md"))


REPO = Path(__file__).resolve().parents[1]


def in_containers(name: str, args: dict) -> tuple[float, dict]:
    """The compiled DAG under kfp.local.DockerRunner through podman's Docker API. The embedded stores (sqlite
    MLflow and Optuna) live in the pipeline root, the one folder the containers share."""
    from kfp import local

    from distillery.platform import kfp_runtime

    conf = REPO / "build" / "container" / "containers.conf"
    penv = {**os.environ, "CONTAINERS_CONF": str(conf)}
    built = subprocess.run(["bash", str(REPO / "scripts" / "container" / "build_image.sh")], env=penv,
                           capture_output=True, text=True, check=True).stdout
    ref, image_id, size = re.search(r"^image (\S+) id (\S+) size (\d+) bytes$", built, re.M).groups()
    home = fresh_home("orchestration-containers")
    home.mkdir(parents=True, exist_ok=True)
    home.chmod(0o777)  # the containers write it as uid 1000
    compiled = home / "compiled"
    # Compiled as for a cluster (compile refuses the smoke profile), run with this benchmark's arguments.
    subprocess.run([str(Path(sys.executable).parent / "distillery"), "compile", name, "--profile", "cpu", "--out",
                    str(compiled)], env={**os.environ, "DISTILLERY_IMAGE": ref}, check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL)
    sock = home / "docker.sock"
    service = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{sock}"], env=penv)
    try:
        while not sock.exists():
            time.sleep(0.1)
        os.environ["DOCKER_HOST"] = f"unix://{sock}"
        local.init(runner=local.DockerRunner(network_mode="host", user="1000", environment={
            "DISTILLERY_HOME": str(home), "DISTILLERY_PIPELINE_ROOT": str(home)}), pipeline_root=str(home),
                   raise_on_error=True)
        func = kfp_runtime.load_compiled(compiled / f"{name}.yaml")
        start = time.perf_counter()
        func(**args)
        seconds = time.perf_counter() - start
    finally:
        service.terminate()
        service.wait(15)
    return seconds, {"image": ref, "image_id": image_id, "image_size_bytes": int(size)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--containers", action="store_true", help="also run the DAG with every step in a container")
    opts = ap.parse_args()

    from distillery.platform import kfp_runtime
    from pipelines import registry
    from pipelines.params import resolve

    func = registry()["tiny-sd"]
    args = resolve("tiny-sd", func, opts.profile, {})
    times: dict[str, float] = {}

    fresh_home("orchestration-inprocess")
    with timed(times, "in_process"):
        in_process(dict(args))

    fresh_home("orchestration-kfp")
    os.environ.pop("DISTILLERY_PARENT_RUN_ID", None)
    with timed(times, "kfp_first"):
        kfp_runtime.run_local(func, args, caching=True)
    with timed(times, "kfp_cached"):
        kfp_runtime.run_local(func, args, caching=True)

    rows = [("DAG wall time: KFP local runner vs in-process", times["kfp_first"], times["in_process"], "s"),
            ("re-run: cached vs first run", times["kfp_cached"], times["kfp_first"], "s")]
    extra = {"profile": opts.profile}
    if opts.containers:
        os.environ.pop("DISTILLERY_PARENT_RUN_ID", None)
        times["containers"], image = in_containers("tiny-sd", args)
        rows.append(("DAG wall time: a container per step vs subprocess per step", times["containers"],
                     times["kfp_first"], "s"))
        extra.update(image)
    report("orchestration", rows, extra={**extra, "seconds": times})


if __name__ == "__main__":
    main()
