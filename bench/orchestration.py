"""Orchestration overhead of the KFP local runner.

1. The tiny-sd DAG through the KFP local runner (one subprocess per step) vs the same step functions
   called one after another in this process (ratio = overhead of process-per-step orchestration).
2. A cached re-run of the DAG vs its first run (ratio = what step caching saves).

    python bench/orchestration.py [--profile smoke]
"""

from __future__ import annotations

import argparse
import os
import tempfile
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="smoke")
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

    report("orchestration", [
        ("DAG wall time: KFP local runner vs in-process", times["kfp_first"], times["in_process"], "s"),
        ("re-run: cached vs first run", times["kfp_cached"], times["kfp_first"], "s"),
    ], extra={"profile": opts.profile, "seconds": times})


if __name__ == "__main__":
    main()
