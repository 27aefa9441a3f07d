"""Hybrid SD steps: significance scoring, tiered pruning (+ the uniform baseline), KD fine-tuning, the tiny VAE,
and the evaluation over split points that also assembles the release (cloud model, edge model, configuration)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from distillery.models.files import seal
from distillery.steps import (checkpoint_dir, dir_hash, evaluator_identity, load_dataset, load_sd_pipeline,
                              log_metrics)

HYBRID_FILE = "hybrid.json"  # the hybrid configuration at the top of a release folder


def _teacher(teacher_dir: str):
    return load_sd_pipeline(teacher_dir, "teacher")


def _probe_set(ds, num_prompts: int, seed: int) -> tuple[list[str], list[int]]:
    prompts = list(ds.class_prompts)
    if not prompts:
        raise ValueError("the dataset has no class_prompts to score the layers with")
    picked = [prompts[i % len(prompts)] for i in range(num_prompts)]
    return picked, [seed * 1000 + i for i in range(num_prompts)]


def score_layers(*, teacher_dir: str, dataset_dir: str, shard: int, num_shards: int, num_prompts: int, steps: int,
                 guidance_scale: float, seed: int) -> dict:
    """Significance of this shard's candidate layers (every num_shards-th, from `shard`)."""
    from distillery.papers.hybrid_sd import pruning, sampler

    if not 0 <= shard < num_shards:
        raise ValueError(f"shard must lie in [0, {num_shards}), got {shard}")
    if num_prompts < 2:
        raise ValueError(f"num_prompts must be >= 2 (a std over samples needs two), got {num_prompts}")
    pipe = _teacher(teacher_dir)
    prompts, seeds = _probe_set(load_dataset(dataset_dir), num_prompts, seed)
    base = sampler.generate_latents(pipe, pipe.unet, prompts, seeds, steps=steps, guidance_scale=guidance_scale)
    mine = pruning.candidates(pipe.unet)[shard::num_shards]
    scores = {}
    for c in mine:
        r = pruning.score_candidate(pipe, c.name, prompts, seeds, steps=steps, guidance_scale=guidance_scale,
                                    base_latents=base)
        scores[c.name] = r["score"]
    return {"scores": scores, **{f"score/{k}": v for k, v in scores.items()}, "layers_scored": float(len(scores))}


def prune(*, teacher_dir: str, scores: list, tiered_dir: str, uniform_dir: str) -> dict:
    """Tiered keep ratios from the collected scores; the uniform baseline at the same parameter count."""
    import mlflow

    from distillery.papers.hybrid_sd import pruning
    from distillery.papers.hybrid_sd.evaluate import unet_flops

    merged: dict[str, float] = {}
    for part in scores:
        merged.update(json.loads(part) if isinstance(part, str) else part)
    pipe = _teacher(teacher_dir)
    expected = {c.name for c in pruning.candidates(pipe.unet)}
    known = {c.name for c in pruning.candidates(pipe.unet, remove_blocks=False)}
    if not expected <= set(merged) <= known:
        raise ValueError(f"scores must cover every candidate layer once; missing {sorted(expected - set(merged))}, "
                         f"unknown {sorted(set(merged) - known)}")
    merged = {k: v for k, v in merged.items() if k in expected}  # a removed block's layers need no tier
    plan = pruning.tiered_plan(merged)
    tiered = pruning.prune(pipe.unet, plan)
    uniform_ratios = pruning.uniform_plan(pipe.unet, pruning.param_count(tiered))
    uniform = pruning.prune(pipe.unet, uniform_ratios)
    for unet, out in ((tiered, tiered_dir), (uniform, uniform_dir)):
        unet.save_pretrained(out, safe_serialization=True)
    mlflow.log_dict({"scores": merged, "tiered": plan, "uniform": uniform_ratios}, "pruning_plan.json")
    teacher_params, teacher_flops = pruning.param_count(pipe.unet), unet_flops(pipe.unet)
    return {"teacher_params": float(teacher_params), "pruned_params": float(pruning.param_count(tiered)),
            "mid_block_removed": float(tiered.mid_block is None),
            "uniform_params": float(pruning.param_count(uniform)),
            "params_ratio": pruning.param_count(tiered) / teacher_params,
            "teacher_flops": teacher_flops, "pruned_flops": unet_flops(tiered), "uniform_flops": unet_flops(uniform),
            "uniform_keep_ratio": next(iter(uniform_ratios.values()))}


def distill_small(*, teacher_dir: str, student_dir: str, dataset_dir: str, out_dir: str, steps: int, batch_size: int,
                  lr: float, seed: int) -> dict:
    """BK-SDM knowledge distillation of a pruned UNet from the teacher (same budget for every student)."""
    from distillery.papers.hybrid_sd import distill, pruning

    ds = load_dataset(dataset_dir)
    cfg = distill.KDConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed).check()
    student = pruning.load_unet(Path(student_dir))
    ckpt = checkpoint_dir("hybrid-kd", data=ds.manifest["content_sha256"], teacher=dir_hash(Path(teacher_dir)),
                          student=dir_hash(Path(student_dir)), cfg=cfg)
    student, metrics = distill.distill_unet(Path(teacher_dir), student, ds.train(), cfg, checkpoint_dir=ckpt,
                                            on_log=log_metrics)
    student.save_pretrained(out_dir, safe_serialization=True)
    return metrics


def train_tiny_vae(*, teacher_dir: str, dataset_dir: str, out_dir: str, steps: int, batch_size: int, lr: float,
                   adv_weight: float, seed: int) -> dict:
    from distillery.papers.hybrid_sd import distill

    ds = load_dataset(dataset_dir)
    cfg = distill.TinyVAEConfig(steps=steps, batch_size=batch_size, lr=lr, adv_weight=adv_weight, seed=seed,
                                adv_start=steps // 2).check()
    ckpt = checkpoint_dir("hybrid-tiny-vae", data=ds.manifest["content_sha256"], teacher=dir_hash(Path(teacher_dir)),
                          cfg=cfg)
    return distill.train_tiny_vae(Path(teacher_dir), ds.train(), Path(out_dir), cfg, checkpoint_dir=ckpt,
                                  on_log=log_metrics)


def assemble_release(teacher_dir: Path, small_dir: Path, tiny_vae_dir: Path, out: Path, config: dict) -> None:
    """release/cloud: the teacher pipeline; release/edge: small UNet, tiny VAE, the shared text encoder, tokenizer
    and scheduler; release/hybrid.json: the split the gate passed."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(teacher_dir, out / "cloud", dirs_exist_ok=True)
    edge = out / "edge"
    for part in ("text_encoder", "tokenizer", "scheduler"):
        shutil.copytree(teacher_dir / part, edge / part, dirs_exist_ok=True)
    shutil.copytree(small_dir, edge / "unet", dirs_exist_ok=True)
    shutil.copytree(tiny_vae_dir, edge / "vae", dirs_exist_ok=True)
    (out / HYBRID_FILE).write_text(json.dumps(config, indent=1))
    seal(out)  # both predictors refuse the release if a file changes later


def evaluate(*, teacher_dir: str, small_dir: str, uniform_dir: str, tiny_vae_dir: str, dataset_dir: str,
             feature_net_dir: str, steps: int, splits: list, orders: list, headline_split: int, guidance_scale: float,
             num_per_class: int, seed: int, table_path: str, release_dir: str) -> dict:
    import mlflow
    from diffusers import AutoencoderTiny

    from distillery.models import image_eval
    from distillery.papers.hybrid_sd import evaluate as ev
    from distillery.papers.hybrid_sd import pruning
    from distillery.platform import tracking

    steps, splits = int(steps), [int(k) for k in splits]
    if int(headline_split) not in splits:
        raise ValueError(f"headline_split {headline_split} must be one of the splits {splits}")
    ds = load_dataset(dataset_dir)
    pipe = _teacher(teacher_dir)
    small, uniform = pruning.load_unet(Path(small_dir)), pruning.load_unet(Path(uniform_dir))
    tiny_vae = AutoencoderTiny.from_pretrained(tiny_vae_dir).eval()
    net = image_eval.FeatureNet.load(Path(feature_net_dir))
    rows, grids = ev.split_table(pipe, small, tiny_vae, ds.holdout(), net, steps=steps, splits=splits,
                                 orders=list(orders), guidance_scale=guidance_scale, num_per_class=num_per_class,
                                 seed=seed, extra_small={"uniform": uniform})
    for key, grid in grids.items():
        tracking.log_image(grid, f"samples/{key}.png")
    mlflow.log_table({k: [r[k] for r in rows] for k in rows[0]}, "split_table.json")
    tracking.log_figure(ev.plot(rows), "quality_vs_cloud_cost.png")
    table = ev.markdown(rows)
    Path(table_path).write_text("# Hybrid SD: quality per split\n\n" + table)
    mlflow.log_text(table, "split_table.md")

    large_step_s, small_step_s = ev.unet_step_seconds_pair(pipe.unet, small)
    costs = {"large_params": float(pruning.param_count(pipe.unet)), "small_params": float(pruning.param_count(small)),
             "tiny_vae_params": float(pruning.param_count(tiny_vae)), "vae_params": float(pruning.param_count(pipe.vae)),
             "large_step_s": large_step_s, "small_step_s": small_step_s,
             "large_flops": ev.unet_flops(pipe.unet), "small_flops": ev.unet_flops(small)}
    costs["params_ratio"] = costs["small_params"] / costs["large_params"]
    costs["step_latency_ratio"] = costs["small_step_s"] / costs["large_step_s"]
    costs.update(ev.vae_report(pipe.vae, tiny_vae, ds.holdout().images[:64]))
    head = ev.headline(rows, steps=steps, split=int(headline_split), uniform_row="uniform_only")
    metrics = {f"{r['row']}_{m}": r[m] for r in rows for m in ("fd", "cond_acc", "cloud_fraction")}
    assemble_release(Path(teacher_dir), Path(small_dir), Path(tiny_vae_dir), Path(release_dir),
                     {"steps": steps, "split": int(headline_split), "order": "large-small",
                      "guidance_scale": guidance_scale, "resolution": int(ds.manifest["resolution"])})
    return {**metrics, **costs, **head, **evaluator_identity(feature_net_dir)}
