"""MoDE steps: MT10 demonstrations, their validation, policy training (MoDE or dense), closed-loop evaluation."""

from __future__ import annotations

from pathlib import Path

from distillery.steps import checkpoint_dir, log_metrics


def collect_demos(*, out_dir: str, episodes_per_task: int, seed: int, demos_uri: str = "") -> dict:
    """Roll out the scripted experts, or copy the demonstrations at `demos_uri` (a path or s3://, e.g. the
    DVC-tracked `demos/mt10`). The run's data revision is DVC's md5 of the artifact, the value dvc.lock records."""
    from distillery.data.demos import collect_mt10_demos, load_demos
    from distillery.platform import storage, tracking, versioning

    out = Path(out_dir)
    if demos_uri:
        storage.download(demos_uri, out)
        manifest = load_demos(out).manifest
    else:
        manifest = collect_mt10_demos(out, episodes_per_task=episodes_per_task, seed=seed)
    tracking.set_data_revision(versioning.content_hash(out), manifest["content_sha256"], dataset="mt10-demos")
    tracking.log_dict(manifest, "manifest.json")
    return {"episodes": manifest["episodes"], "steps": manifest["steps"],
            "expert_failures": float(sum(manifest.get("expert_failures", {}).values()))}


def validate_demos(*, dataset_dir: str, report_path: str, min_episodes_per_task: int) -> dict:
    """Great Expectations over the demonstrations; a failure stops the DAG here naming every failed expectation."""
    from distillery.data.demos import validate_demos as run
    from distillery.steps.data import enforce_validation

    result = run(Path(dataset_dir), Path(report_path), min_episodes_per_task=min_episodes_per_task)
    return enforce_validation(result, report_path)


def train(*, dataset_dir: str, out_dir: str, dense: bool, width: int, depth: int, num_experts: int, top_k: int,
          expert_hidden: int, chunk: int, obs_history: int, steps: int, batch_size: int, lr: float,
          sampling_steps: int, seed: int) -> dict:
    from distillery.data.demos import load_demos
    from distillery.papers.mode import MoDEConfig
    from distillery.papers.mode.policy import train_policy

    demos = load_demos(Path(dataset_dir))
    cfg = MoDEConfig(width=width, depth=depth, heads=4, num_experts=num_experts, top_k=top_k,
                     expert_hidden=expert_hidden, chunk=chunk, obs_history=obs_history, dense=dense)
    ckpt = checkpoint_dir("train-dense" if dense else "train-mode", data=demos.manifest["content_sha256"], cfg=cfg,
                          steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    return train_policy(demos, Path(out_dir), cfg, steps=steps, batch_size=batch_size, lr=lr,
                        sampling_steps=sampling_steps, seed=seed, checkpoint_dir=ckpt, on_log=log_metrics)


FRAMES_EVERY = 10  # env steps between rendered frames of the first evaluation episode of each task


def evaluate(*, mode_dir: str, dense_dir: str, episodes_per_task: int, max_steps: int, execute: int, seed: int,
             table_path: str) -> dict:
    """Closed-loop MT10 success of MoDE (served: cached and frozen; uncached) and the dense baseline, on the
    variations the demonstrations cover (`*_seen_success_rate`, MT10's protocol) and on unseen ones
    (`*_unseen_success_rate`, another benchmark seed). The gate's `success_rate` is the served MoDE's on unseen
    variations. Latencies are timed in turn: `cache_speedup` is what caching alone gains (both eager),
    `frozen_speedup` what the frozen graph adds, `served_speedup` both."""
    import mlflow
    import numpy as np

    from distillery.papers.mode import evaluate as ev
    from distillery.papers.mode.policy import Policy
    from distillery.platform import tracking

    served = Policy(Path(mode_dir))  # expert cache, frozen graph: what the endpoint runs
    policies = {"mode-cached": served, "mode": served.using("uncached"), "dense": Policy(Path(dense_dir))}
    obs = np.random.default_rng(seed).normal(size=(1, served.cfg.obs_history, served.cfg.obs_dim)).astype(np.float32)
    timed = (served, served.using("cached"), policies["mode"], policies["dense"])
    ev.median_latencies(timed, obs, served.tasks[:1], 3)  # warm-up
    t_served, t_eager, t_plain, t_dense = ev.median_latencies(timed, obs, served.tasks[:1], 20)
    latency = {"mode-cached": t_served, "mode": t_plain, "dense": t_dense}
    rows, metrics = [], {"mode_eager_cached_latency_s": t_eager}
    for name, policy in policies.items():
        # Reset seeds from 1000, apart from the demonstrations'.
        result = ev.evaluate_policy(policy, episodes_per_task=episodes_per_task, seed=1000 + seed,
                                    max_steps=max_steps, execute=execute, frames_every=FRAMES_EVERY)
        unseen = None if name == "mode" else ev.evaluate_policy(  # uncached MoDE acts as the cached one does
            policy, episodes_per_task=episodes_per_task, seed=1000 + seed, max_steps=max_steps, execute=execute,
            benchmark_seed=ev.UNSEEN_BENCHMARK_SEED)
        flops, active = ev.flops_per_chunk(policy), policy.net.active_parameters()
        key = name.replace("-", "_")
        metrics.update({f"{key}_seen_success_rate": result["success_rate"], f"{key}_latency_s": latency[name],
                        f"{key}_flops_per_chunk": flops, f"{key}_active_parameters": float(active),
                        **{f"{key}_success_{t.replace('-', '_')}": v for t, v in result["per_task"].items()}})
        if unseen is not None:
            metrics[f"{key}_unseen_success_rate"] = unseen["success_rate"]
        rows.append({"policy": name, "seen_success_rate": result["success_rate"],
                     "unseen_success_rate": unseen["success_rate"] if unseen else float("nan"), **result["per_task"],
                     "latency_per_chunk_s": latency[name], "flops_per_chunk": flops, "active_parameters": active})
        tracking.log_figure(ev.trajectory_plot(result["trajectories"], name), f"trajectories/{name}.png")
        if result["frame_strips"]:
            tracking.log_figure(ev.frame_strips_figure(result["frame_strips"], name), f"frames/{name}.png")
        else:
            mlflow.log_text(f"no frames: MuJoCo could not render ({result['render_error']})", f"frames/{name}.txt")
    mlflow.log_table({k: [r[k] for r in rows] for k in rows[0]}, "evaluation_table.json")
    lines = ["| policy | success (seen variations) | success (unseen) | latency / chunk (ms) | GFLOPs / chunk | "
             "active params |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['policy']} | {r['seen_success_rate']:.2f} | {r['unseen_success_rate']:.2f} | "
              f"{1000 * r['latency_per_chunk_s']:.1f} | {r['flops_per_chunk'] / 1e9:.3f} | {r['active_parameters']:,} |"
              for r in rows]
    Path(table_path).write_text("# MoDE evaluation (Meta-World MT10)\n\n" + "\n".join(lines) + "\n")
    mlflow.log_text("\n".join(lines), "evaluation_table.md")
    tracking.log_dict({r["policy"]: r for r in rows}, "evaluation.json")
    return {**metrics, "success_rate": metrics["mode_cached_unseen_success_rate"],
            "seen_success_rate": metrics["mode_cached_seen_success_rate"],
            "success_vs_dense": metrics["mode_cached_unseen_success_rate"] - metrics["dense_unseen_success_rate"],
            "cache_speedup": t_plain / max(t_eager, 1e-12),
            "frozen_speedup": t_eager / max(t_served, 1e-12),
            "served_speedup": t_plain / max(t_served, 1e-12),
            "cached_matches_uncached": float(_same_actions(policies["mode-cached"], policies["mode"]))}


def _same_actions(cached, uncached, tol: float = 1e-5) -> bool:
    import numpy as np

    rng = np.random.default_rng(0)
    obs = rng.normal(size=(4, cached.cfg.obs_history, cached.cfg.obs_dim)).astype(np.float32)
    tasks = [cached.tasks[i % len(cached.tasks)] for i in range(4)]
    return bool(np.abs(cached.act(obs, tasks, seed=3) - uncached.act(obs, tasks, seed=3)).max() <= tol)
