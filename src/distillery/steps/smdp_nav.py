"""SMDP navigation steps: scenario sets and their validation, DPPO training (adaptive SMDP / naive, fixed
durations), closed-loop evaluation in the training world and in ir-sim."""

from __future__ import annotations

import html
import json
from pathlib import Path

from distillery.steps import checkpoint_dir, log_metrics


def generate_scenarios(*, out_dir: str, train_per_level: int, eval_per_level: int, seed: int) -> dict:
    """A training set and an evaluation set (another seed) of scenarios at every density level."""
    from distillery.papers.smdp_nav import NavConfig
    from distillery.papers.smdp_nav import scenarios as S
    from distillery.platform import tracking, versioning

    cfg, out = NavConfig(), Path(out_dir)
    manifests = {}
    for split, n, s in (("train", train_per_level, seed), ("eval", eval_per_level, seed + 10_000)):
        manifests[split] = S.save(S.generate(n, s, cfg), out / split, cfg, seed=s, split=split)
    (out / "manifest.json").write_text(json.dumps(manifests, indent=1))
    digest = versioning.content_hash(out)
    tracking.set_data_revision(digest, manifests["train"]["content_sha256"], dataset="smdp-nav-scenarios")
    tracking.log_dict(manifests, "manifest.json")
    return {"train_scenarios": float(manifests["train"]["scenarios"]), "eval_scenarios": float(manifests["eval"]["scenarios"])}


def validate_scenarios(*, dataset_dir: str, report_path: str, min_density: float, max_density: float) -> dict:
    """Every scenario: start and goal free and inside the arena, goal reachable, obstacle density in range. A
    failure stops the DAG here, naming the scenarios and what is wrong with each."""
    from distillery.papers.smdp_nav import NavConfig
    from distillery.papers.smdp_nav import scenarios as S
    from distillery.platform import tracking

    if not 0 <= min_density < max_density <= 1:
        raise ValueError(f"need 0 <= min_density < max_density <= 1, got {min_density}, {max_density}")
    reports, rows = {}, []
    for split in ("train", "eval"):
        arrays, manifest = S.load(Path(dataset_dir) / split)
        r = S.validate(arrays, NavConfig(**manifest["nav_config"]), min_density, max_density)
        reports[split] = r
        rows += [f"<tr><td>{split}</td><td>{i}</td><td>{html.escape('; '.join(p))}</td></tr>"
                 for i, p in r["invalid"].items()]
    Path(report_path).write_text(
        "<h3>Scenario validation</h3><p>" + ", ".join(
            f"{s}: {r['scenarios']} scenarios, {len(r['invalid'])} invalid, density {r['density_min']:.3f}-"
            f"{r['density_max']:.3f}" for s, r in reports.items()) + f" (allowed {min_density}-{max_density})</p>"
        "<table><tr><th>split</th><th>scenario</th><th>problems</th></tr>" + "".join(rows) + "</table>")
    tracking.log_html(Path(report_path), "validation_report.html")
    bad = {s: r["invalid"] for s, r in reports.items() if r["invalid"]}
    if bad:
        listed = "; ".join(f"{s} #{i}: {', '.join(p)}" for s, b in bad.items() for i, p in list(b.items())[:10])
        raise ValueError(f"invalid scenarios ({sum(map(len, bad.values()))}): {listed}")
    return {f"{s}_density_{k}": r[f"density_{k}"] for s, r in reports.items() for k in ("min", "max", "mean")}


def train(*, dataset_dir: str, out_dir: str, variant: str, fixed_tau: float, sim_budget_s: float, rollout_s: float,
          num_envs: int, lr: float, hidden: int, gamma: float, seed: int) -> dict:
    from dataclasses import replace

    from distillery.papers.smdp_nav import NavConfig
    from distillery.papers.smdp_nav import scenarios as S
    from distillery.papers.smdp_nav.train import train_policy
    from distillery.rl.ppo import PPOConfig

    arrays, manifest = S.load(Path(dataset_dir) / "train")
    nav = replace(NavConfig(**manifest["nav_config"]), fixed_tau=fixed_tau if variant == "fixed" else 0.0)
    ppo = PPOConfig(lr=lr, num_envs=num_envs, hidden=hidden)
    step = f"train-{variant}" + (f"-{fixed_tau:g}s" if variant == "fixed" else "")
    ckpt = checkpoint_dir(step, data=manifest["content_sha256"], nav=nav, ppo=ppo, budget=sim_budget_s,
                          rollout=rollout_s, gamma=gamma, seed=seed)
    return train_policy(arrays, Path(out_dir), nav, ppo, variant=variant, sim_budget_s=sim_budget_s,
                        rollout_s=rollout_s, gamma=gamma, seed=seed, checkpoint_dir=ckpt, on_log=log_metrics,
                        data_key=manifest["content_sha256"])


def evaluate(*, dataset_dir: str, policy_dirs: dict[str, str], irsim_scenarios: int, table_path: str) -> dict:
    """Every policy on the evaluation set; ir-sim on its own RVO scenarios when `irsim_scenarios` > 0. The gate's
    success_rate is the adaptive SMDP policy's; the comparisons the issue asks for are returned beside it."""
    import mlflow
    import numpy as np
    import torch

    from distillery.papers.smdp_nav import evaluate as ev
    from distillery.papers.smdp_nav import scenarios as S
    from distillery.papers.smdp_nav.policy import NavPolicy
    from distillery.platform import tracking

    torch.set_num_threads(1)  # batch-of-one MLP calls between simulator steps
    arrays, _ = S.load(Path(dataset_dir) / "eval")
    levels = [str(x) for x in arrays["levels"]]
    policies = {name: NavPolicy(Path(p)) for name, p in policy_dirs.items()}
    results = {name: ev.run_episodes(p, arrays, record=True) for name, p in policies.items()}
    summary = {name: ev.summarize(r, levels) for name, r in results.items()}
    if irsim_scenarios > 0:
        from distillery.papers.smdp_nav import irsim_eval

        for name, p in policies.items():
            summary[name].update({f"irsim_{k}": v for k, v in irsim_eval.evaluate(p, irsim_scenarios, seed=0).items()})
    metrics = {}
    for name, s in summary.items():
        key = name.replace("-", "_").replace(".", "p")
        metrics.update({f"{key}_{k}": v for k, v in s.items() if np.isfinite(v)})
    fixed = [n for n in summary if n.startswith("fixed")]
    best_fixed = max(fixed, key=lambda n: summary[n]["success_rate"])
    shortest = min(fixed, key=lambda n: policies[n].cfg.fixed_tau)
    a, naive = summary["adaptive-smdp"], summary["adaptive-naive"]
    fixed_rates = [summary[n]["success_rate"] for n in fixed]
    metrics.update({
        "success_rate": a["success_rate"], "collision_rate": a["collision_rate"],
        "success_vs_best_fixed": a["success_rate"] - summary[best_fixed]["success_rate"],
        "success_vs_naive": a["success_rate"] - naive["success_rate"],
        "decisions_ratio_vs_shortest_fixed": a["decisions_per_episode"] / max(summary[shortest]["decisions_per_episode"], 1e-9),
        "fixed_success_spread": max(fixed_rates) - min(fixed_rates)})
    if "irsim_success_rate" in a:
        metrics["irsim_success_ratio"] = a["irsim_success_rate"] / max(a["success_rate"], 1e-9)
    # Plots: chosen duration vs local density (adaptive policies), a crowded scenario's trajectories.
    adaptive = {n: r for n, r in results.items() if not policies[n].cfg.fixed_tau}
    tracking.log_figure(ev.duration_vs_density(adaptive), "duration_vs_density.png")
    crowded = np.flatnonzero(arrays["level"] == len(levels) - 1)
    for i in crowded[:2]:
        tracking.log_figure(ev.trajectory_plot(arrays, int(i), results, policies["adaptive-smdp"].cfg.world),
                            f"trajectories/scenario-{int(i)}.png")
    for name, r in adaptive.items():
        for b, tau in enumerate(ev.binned_durations(r)):
            if np.isfinite(tau):
                metrics[f"{name.replace('-', '_')}_duration_density_bin{b}"] = tau
    cols = ["success_rate", "success_rate_ci", "collision_rate", "time_to_goal_s", "path_length_m",
            "decisions_per_episode", "mean_duration_s"] + [f"{lv}_success_rate" for lv in levels] + \
        (["irsim_success_rate"] if irsim_scenarios > 0 else [])
    lines = ["| policy | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    lines += [f"| {n} | " + " | ".join(f"{s.get(c, float('nan')):.3g}" for c in cols) + " |" for n, s in summary.items()]
    Path(table_path).write_text("# SMDP navigation evaluation\n\n" + "\n".join(lines) + "\n")
    mlflow.log_text("\n".join(lines), "evaluation_table.md")
    tracking.log_dict(summary, "evaluation.json")
    return metrics
