"""MoDE targets: expert caching vs uncached MoDE (latency per action chunk, identical actions), active parameters and
FLOPs per chunk next to the dense baseline, and — with --run — MT10 success rates from one pipeline run.

Served MoDE is the expert cache frozen into one TorchScript graph (possible because caching leaves no data-dependent
dispatch); the eager cached sampler is reported too, so the share of the gain that is caching alone is visible.
The dense baseline is frozen the same way.

    python bench/mode.py                      # caching on the cpu profile's architecture (no training needed)
    python bench/mode.py --policy-dir DIR     # the same for a trained policy folder
    python bench/mode.py --run --profile cpu  # also run the mode pipeline and report success rates
    python bench/mode.py --home DIR           # measure a finished `mode` run again (DIR: its DISTILLERY_HOME)

With trained policies, MoDE and the dense baseline are also rolled out on unseen MT10 variations (drawn from
another benchmark seed than the demonstrations'): `--unseen-episodes` per task, 0 to skip.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import RESULTS, fresh_home, report

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy-dir", type=Path)
    ap.add_argument("--run", action="store_true", help="run the mode pipeline first and use its policies")
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--home", type=Path, help="DISTILLERY_HOME of a finished mode run to measure")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--unseen-seed", type=int, default=7)
    ap.add_argument("--unseen-episodes", type=int, default=3)
    opts = ap.parse_args()

    import numpy as np
    import torch

    from distillery.papers.mode import MoDEConfig, MoDEPolicy
    from distillery.papers.mode import evaluate as ev
    from distillery.papers.mode.policy import Policy, save_policy
    from pipelines.mode import mode as mode_pipeline
    from pipelines.params import resolve

    torch.set_num_threads(1)  # one request at a time on one core: what a CPU predictor replica does
    extra: dict = {}
    success, dense_dir = None, None
    home = opts.home
    if opts.run:
        home = fresh_home(f"mode-{opts.profile}")
        cmd = [sys.executable, "-m", "distillery.cli", "run", "mode", "--profile", opts.profile]
        for s in opts.sets:
            cmd += ["--set", s]
        t = time.perf_counter()
        subprocess.run(cmd, cwd=REPO, env=os.environ, check=True)
        extra["pipeline_s"] = time.perf_counter() - t
    if home is not None:
        from mlflow import MlflowClient

        from distillery.platform import tracking
        from distillery.settings import get_settings

        os.environ["DISTILLERY_HOME"] = str(home)
        get_settings.cache_clear()
        tracking.configure()
        c = MlflowClient()
        exp = c.get_experiment_by_name("distillery/mode")
        success = c.search_runs([exp.experiment_id], "tags.task = 'evaluate'", max_results=1,
                                order_by=["attributes.start_time DESC"])[0].data.metrics
        trained = {json.loads(p.read_text())["config"]["dense"]: p.parent for p in Path(home).rglob("policy/policy.json")}
        opts.policy_dir, dense_dir = trained[False], trained[True]
    if opts.policy_dir is None:  # the cpu profile's architecture, untrained: caching cost does not depend on training
        args = resolve("mode", mode_pipeline, opts.profile, {})
        keys = ("width", "depth", "num_experts", "top_k", "expert_hidden", "chunk", "obs_history")
        cfg = MoDEConfig(**{k: args[k] for k in keys})
        opts.policy_dir = RESULTS / "homes" / "mode-untrained"
        torch.manual_seed(0)
        save_policy(opts.policy_dir, MoDEPolicy(cfg), sampling_steps=args["sampling_steps"],
                    obs_mean=np.zeros(39), obs_std=np.ones(39), tasks=["reach-v3"], instructions=["reach"],
                    goals=torch.randn(1, cfg.text_dim))
        extra["policy"] = f"untrained, {opts.profile} profile architecture"
    cached = Policy(opts.policy_dir)
    eager, plain = cached.using("cached"), cached.using("uncached")
    if dense_dir is None:  # an untrained dense baseline of the same active size, for latency and FLOPs
        dense_cfg = MoDEConfig(**{**cached.cfg.__dict__, "dense": True})
        dense_dir = RESULTS / "homes" / "mode-dense-same-size"
        save_policy(dense_dir, MoDEPolicy(dense_cfg), sampling_steps=len(cached.sigmas), obs_mean=np.zeros(39),
                    obs_std=np.ones(39), tasks=cached.tasks, instructions=cached.instructions, goals=cached.goals)
    dense = Policy(dense_dir)
    obs = np.random.default_rng(0).normal(size=(1, cached.cfg.obs_history, cached.cfg.obs_dim)).astype(np.float32)
    tasks = [cached.tasks[0]]
    policies = (cached, eager, plain, dense)
    ev.median_latencies(policies, obs, tasks, 5)  # warm-up
    t_cached, t_eager, t_plain, t_dense = ev.median_latencies(policies, obs, tasks, opts.repeats)
    diff = max(float(np.abs(p.act(obs, tasks, seed=s) - plain.act(obs, tasks, seed=s)).max())
               for s in range(10) for p in (cached, eager))
    rows = [
        ("latency / chunk: MoDE served (cache, frozen) vs uncached", t_cached, t_plain, "s"),
        ("latency / chunk: MoDE cached vs uncached (both eager)", t_eager, t_plain, "s"),
        ("latency / chunk: MoDE served vs dense (same active size, frozen)", t_cached, t_dense, "s"),
        ("FLOPs / chunk: MoDE cached vs uncached", ev.flops_per_chunk(cached), ev.flops_per_chunk(plain), "FLOP"),
        ("FLOPs / chunk: MoDE cached vs dense", ev.flops_per_chunk(cached), ev.flops_per_chunk(dense), "FLOP"),
        ("active parameters: MoDE vs dense", cached.net.active_parameters(), dense.net.active_parameters(), ""),
        ("active vs total parameters: MoDE", cached.net.active_parameters(),
         sum(p.numel() for p in cached.net.parameters()), ""),
    ]
    if success:
        seen = lambda k: success.get(f"{k}_seen_success_rate", success.get(f"{k}_success_rate"))  # older runs
        rows += [("MT10 success rate: MoDE (cached) vs dense", seen("mode_cached"), seen("dense"), "")]
        extra["per_task"] = {k: v for k, v in success.items() if "_success_" in k}
        if opts.unseen_episodes:
            unseen = {}
            for name, policy in (("mode", cached), ("dense", dense)):
                unseen[name] = ev.evaluate_policy(policy, episodes_per_task=opts.unseen_episodes,
                                                  benchmark_seed=opts.unseen_seed, seed=0)
                extra[f"unseen_per_task_{name}"] = unseen[name]["per_task"]
            rows += [(f"MT10 success on unseen variations (benchmark seed {opts.unseen_seed}): MoDE vs dense",
                      unseen["mode"]["success_rate"], unseen["dense"]["success_rate"], "")]
    extra.update(max_abs_action_diff_cached_vs_uncached=diff, sampling_steps=len(cached.sigmas),
                 config=cached.cfg.__dict__)
    report("mode", rows, extra=extra)
    print(json.dumps({"max_abs_action_diff": diff, "identical_within_1e-5": diff <= 1e-5}))


if __name__ == "__main__":
    main()
