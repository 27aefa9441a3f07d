"""Pipeline parameters: profiles (smoke / cpu / paper presets) and validation before any step runs."""

from __future__ import annotations

import inspect
from typing import Any, Callable

from kfp import dsl
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model


def tracking_args(pipeline: str) -> dict:
    """Arguments every component takes so its nested MLflow run finds the pipeline's parent run: the KFP run id
    (a placeholder, so step caching is unaffected). `distillery run` also names the parent run it opened in
    DISTILLERY_PARENT_RUN_ID; on a cluster the first step creates the parent run for the KFP run."""
    return {"pipeline": pipeline, "kfp_run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER}


_SD_TRAINING = {
    "resolution": dict(ge=16, le=512, multiple_of=8),
    "per_class": dict(ge=2, le=100_000),
    "holdout_fraction": dict(gt=0.0, lt=0.9),
    "balance_tolerance": dict(gt=0.0, le=1.0),
    "feature_steps": dict(ge=1),
    "vae_steps": dict(ge=1),
    "vae_batch_size": dict(ge=1, le=4096),
    "vae_lr": dict(gt=0.0, lt=1.0),
    "unet_steps": dict(ge=1),
    "unet_batch_size": dict(ge=1, le=4096),
    "unet_lr": dict(gt=0.0, lt=1.0),
    "cond_dropout": dict(ge=0.0, lt=1.0),
    "eval_per_class": dict(ge=2, le=10_000),
    "eval_steps": dict(ge=1, le=1000),
    "guidance_scale": dict(ge=1.0, le=30.0),
    "model_name": dict(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$"),
    "sources": dict(pattern=r"^(mnist|emoji)(,(mnist|emoji))*$"),
}

_SCOTT = {
    **_SD_TRAINING,
    "sweep_workers": dict(min_length=1, max_length=64),
    "trials_per_worker": dict(ge=1, le=1000),
    "trial_steps": dict(ge=1),
    "trial_rungs": dict(ge=1, le=6),
    "sweep_eval_per_class": dict(ge=2, le=10_000),
    "discriminator": dict(pattern=r"^(teacher|latent)$"),
    "distill_steps": dict(ge=1),
    "distill_batch_size": dict(ge=1, le=4096),
    "solver_substeps": dict(ge=1, le=20),
    "skip": dict(ge=1, le=100),
    "teacher_eval_steps": dict(min_length=1, max_length=10),
    "student_eval_steps": dict(min_length=1, max_length=8),
}

_HYBRID = {
    **_SD_TRAINING,
    "score_shards": dict(min_length=1, max_length=64),
    "score_prompts": dict(ge=2, le=10_000),
    "score_steps": dict(ge=1, le=1000),
    "kd_steps": dict(ge=1),
    "kd_batch_size": dict(ge=1, le=4096),
    "kd_lr": dict(gt=0.0, lt=1.0),
    "tiny_vae_steps": dict(ge=1),
    "tiny_vae_batch_size": dict(ge=1, le=4096),
    "tiny_vae_lr": dict(gt=0.0, lt=1.0),
    "tiny_vae_adv_weight": dict(ge=0.0),
    "splits": dict(min_length=1, max_length=32),
    "orders": dict(min_length=1, max_length=2),
    "headline_split": dict(ge=0),
}

_MODE = {
    "episodes_per_task": dict(ge=1, le=10_000),
    "min_episodes_per_task": dict(ge=1),
    "width": dict(ge=8, le=4096, multiple_of=4),
    "depth": dict(ge=1, le=64),
    "num_experts": dict(ge=1, le=64),
    "top_k": dict(ge=1, le=64),
    "expert_hidden": dict(ge=1, le=65_536),
    "chunk": dict(ge=1, le=64),
    "obs_history": dict(ge=1, le=32),
    "train_steps": dict(ge=1),
    "batch_size": dict(ge=1, le=65_536),
    "lr": dict(gt=0.0, lt=1.0),
    "sampling_steps": dict(ge=1, le=100),
    "eval_episodes_per_task": dict(ge=1, le=1000),
    "eval_max_steps": dict(ge=1, le=500),
    "execute": dict(ge=1, le=64),
    "model_name": dict(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$"),
}

_SMDP_NAV = {
    "train_per_level": dict(ge=1, le=100_000),
    "eval_per_level": dict(ge=1, le=10_000),
    "min_density": dict(ge=0.0, lt=1.0),
    "max_density": dict(gt=0.0, le=1.0),
    "sim_budget_s": dict(gt=0.0),
    "rollout_s": dict(ge=1.0, le=10_000.0),
    "num_envs": dict(ge=1, le=4096),
    "lr": dict(gt=0.0, lt=1.0),
    "hidden": dict(ge=8, le=4096),
    "gamma": dict(gt=0.0, le=1.0),
    "fixed_tau_short": dict(gt=0.0, le=10.0),
    "fixed_tau_mid": dict(gt=0.0, le=10.0),
    "fixed_tau_long": dict(gt=0.0, le=10.0),
    "irsim_scenarios": dict(ge=0, le=10_000),
    "model_name": dict(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$"),
}

_TEACHER_PRIOR = {
    "episode_steps": dict(ge=2, le=100_000),
    "terrain_height": dict(ge=0.0, le=0.3),
    "push_force": dict(ge=0.0, le=1000.0),
    "obs_noise": dict(ge=0.0, le=10.0),
    "history": dict(ge=1, le=64),
    "heights_ahead": dict(ge=1, le=64),
    "teacher_steps": dict(ge=1),
    "student_steps": dict(ge=1),
    "rollout_steps": dict(ge=2, le=100_000),
    "num_envs": dict(ge=1, le=4096),
    "lr": dict(gt=0.0, lt=1.0),
    "hidden": dict(ge=8, le=4096),
    "rollout_episodes": dict(ge=1, le=100_000),
    "min_episode_length": dict(ge=1),
    "sweep_workers": dict(min_length=1, max_length=64),
    "trials_per_worker": dict(ge=1, le=1000),
    "trial_steps": dict(ge=1),
    "sweep_eval_episodes": dict(ge=1, le=10_000),
    "eval_episodes": dict(ge=2, le=10_000),
    "noise_levels": dict(min_length=1, max_length=8),
    "wide_factor": dict(ge=1.0, le=10.0),
    "model_name": dict(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$"),
}

_SWIFT = {
    **_SD_TRAINING,
    "addons": dict(min_length=2, max_length=16),
    "lora_steps": dict(ge=1),
    "lora_rank": dict(ge=1, le=256),
    "lora_lr": dict(gt=0.0, lt=1.0),
    "controlnet_steps": dict(ge=1),
    "controlnet_lr": dict(gt=0.0, lt=1.0),
    "addon_batch_size": dict(ge=1, le=4096),
    "serving_steps": dict(ge=2, le=1000),
    "wait_fraction": dict(ge=0.0, lt=1.0),
    "serving_trials": dict(ge=1, le=100),
    "quality_seeds": dict(ge=1, le=1000),
}

CONSTRAINTS: dict[str, dict[str, Any]] = {"tiny-sd": _SD_TRAINING, "scott": _SCOTT, "mode": _MODE,
                                          "smdp-nav": _SMDP_NAV, "hybrid-sd": _HYBRID,
                                          "teacher-prior": _TEACHER_PRIOR, "swift-diffusion": _SWIFT}

# Profiles: smoke runs the whole DAG on 2 CPU cores in minutes (tests); cpu gives meaningful numbers in
# about an hour on 2 cores (benchmarks, README figures); paper is the scale for a GPU cluster.
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "tiny-sd": {
        "smoke": dict(per_class=40, feature_steps=100, vae_steps=60, unet_steps=150, eval_per_class=4,
                      eval_steps=8, gate_thresholds={"fd": ["max", 1e6], "cond_acc": ["min", 0.0]}),
        "cpu": dict(per_class=600, feature_steps=1500, vae_steps=2500, unet_steps=8000, eval_per_class=50,
                    eval_steps=25, gate_thresholds={"fd": ["max", 50.0], "cond_acc": ["min", 0.5]}),
        "paper": dict(sources="mnist", resolution=64, per_class=5000, feature_steps=5000, vae_steps=50_000,
                      unet_steps=200_000, vae_batch_size=128, unet_batch_size=128, eval_per_class=500,
                      eval_steps=50, gpu=True, gate_thresholds={"fd": ["max", 20.0], "cond_acc": ["min", 0.8]}),
    },
    "mode": {
        "smoke": dict(episodes_per_task=2, width=32, depth=2, expert_hidden=64, train_steps=30, batch_size=64,
                      sampling_steps=4, eval_episodes_per_task=1, eval_max_steps=24,
                      gate_thresholds={"success_rate": ["min", 0.0], "cached_matches_uncached": ["min", 1.0]}),
        "cpu": dict(episodes_per_task=50, train_steps=10_000, batch_size=128, lr=5e-4, eval_episodes_per_task=5,
                    gate_thresholds={"success_rate": ["min", 0.5], "cached_matches_uncached": ["min", 1.0]}),
        "paper": dict(episodes_per_task=100, width=256, depth=8, expert_hidden=512, train_steps=200_000,
                      batch_size=512, eval_episodes_per_task=20, gpu=True,
                      gate_thresholds={"success_rate": ["min", 0.7], "cached_matches_uncached": ["min", 1.0]}),
    },
    "smdp-nav": {
        "smoke": dict(train_per_level=4, eval_per_level=2, sim_budget_s=480.0, rollout_s=10.0, num_envs=8,
                      hidden=32, irsim_scenarios=1, gate_thresholds={"success_rate": ["min", 0.0]}),
        "cpu": dict(train_per_level=200, eval_per_level=50, sim_budget_s=100_000.0, irsim_scenarios=20,
                    gate_thresholds={"success_rate": ["min", 0.5]}),
        "paper": dict(train_per_level=1000, eval_per_level=200, sim_budget_s=2_000_000.0, num_envs=64, hidden=256,
                      irsim_scenarios=100, gpu=True, gate_thresholds={"success_rate": ["min", 0.7]}),
    },
    "teacher-prior": {
        "smoke": dict(episode_steps=24, history=2, heights_ahead=4, teacher_steps=192, student_steps=96,
                      rollout_steps=24, num_envs=4, hidden=16, rollout_episodes=4, min_episode_length=2,
                      sweep_workers=[0, 1], trials_per_worker=1, trial_steps=96, sweep_eval_episodes=2,
                      eval_episodes=2, noise_levels=[0.0, 1.0], render=False,
                      gate_thresholds={"return_ratio_vs_teacher": ["min", 0.0], "onnx_max_abs_diff": ["max", 1e-5]}),
        "cpu": dict(teacher_steps=1_000_000, student_steps=600_000, trials_per_worker=2, trial_steps=100_000,
                    eval_episodes=32,
                    gate_thresholds={"return_ratio_vs_teacher": ["min", 0.5], "onnx_max_abs_diff": ["max", 1e-5]}),
        "paper": dict(episode_steps=1000, terrain_height=0.08, teacher_steps=20_000_000, student_steps=10_000_000,
                      num_envs=64, hidden=256, history=5, rollout_episodes=256, sweep_workers=[0, 1, 2, 3],
                      trials_per_worker=4, trial_steps=2_000_000, eval_episodes=128, gpu=True,
                      gate_thresholds={"return_ratio_vs_teacher": ["min", 0.85], "onnx_max_abs_diff": ["max", 1e-5]}),
    },
    "hybrid-sd": {
        # smoke names its sources: the containerized test runs it over the compiled cpu profile's defaults
        "smoke": dict(sources="emoji", per_class=40, feature_steps=100, vae_steps=60, unet_steps=150, score_prompts=2,
                      score_steps=2, kd_steps=4, kd_batch_size=8, tiny_vae_steps=6, tiny_vae_batch_size=8,
                      eval_steps=5, splits=[0, 2, 5], headline_split=2, eval_per_class=2,
                      gate_thresholds={"fd_ratio_large_small_vs_large": ["max", 1e6],
                                       "cloud_flops_ratio_large_small": ["max", 1.0]}),
        # cpu and paper: digits, whose classes hold thousands (the smallest emoji class has 85 images)
        "cpu": dict(sources="mnist", per_class=300, feature_steps=1000, vae_steps=1500, unet_steps=4000,
                    score_prompts=16, score_steps=10, kd_steps=4000, tiny_vae_steps=1500, eval_steps=25,
                    splits=[0, 5, 10, 20, 25], headline_split=10, eval_per_class=64,
                    gate_thresholds={"fd_ratio_large_small_vs_large": ["max", 1.15],
                                     "cloud_flops_ratio_large_small": ["max", 0.4]}),
        "paper": dict(sources="mnist", resolution=64, per_class=2000, feature_steps=5000, vae_steps=50_000,
                      unet_steps=200_000, vae_batch_size=128, unet_batch_size=128, score_shards=[0, 1, 2, 3],
                      score_prompts=64, score_steps=25, kd_steps=50_000, kd_batch_size=128, tiny_vae_steps=50_000,
                      tiny_vae_batch_size=128, eval_steps=25, splits=[0, 5, 10, 15, 20, 25], headline_split=10,
                      eval_per_class=500, gpu=True,
                      gate_thresholds={"fd_ratio_large_small_vs_large": ["max", 1.15],
                                       "cloud_flops_ratio_large_small": ["max", 0.4]}),
    },
    # cpu: the targets where 2 cores allow them. A ControlNet + cold LoRA at <= 0.5x the baseline is out of
    # a 2-core CPU's reach at this model size (README, Benchmarks: 0.68-0.79x), so 0.9 here.
    "swift-diffusion": {
        "smoke": dict(resolution=16, per_class=12, feature_steps=20, vae_steps=10, unet_steps=10, lora_steps=2,
                      controlnet_steps=2, addon_batch_size=8, eval_steps=2, eval_per_class=2, serving_steps=5, serving_trials=1,
                      quality_seeds=2,
                      gate_thresholds={"lora_style_fd_ratio_max": ["max", 1e6],
                                       "controlnet_edges_edge_f1_gain": ["min", -1.0],
                                       "latency_ratio_cn_cold_lora": ["max", 1e6], "ssim_late_patch": ["min", 0.0]}),
        "cpu": dict(per_class=300, feature_steps=1000, vae_steps=1500, unet_steps=4000, lora_steps=600,
                    controlnet_steps=800, eval_steps=20, eval_per_class=16, serving_steps=20, serving_trials=5,
                    quality_seeds=8, compile_backbone=True,
                    gate_thresholds={"lora_style_fd_ratio_max": ["max", 0.9],
                                     "controlnet_edges_edge_f1_gain": ["min", 0.05],
                                     "latency_ratio_cn_cold_lora": ["max", 0.9], "cold_lora_overhead": ["max", 0.1],
                                     "ssim_late_patch": ["min", 0.85], "fd_ratio_late_patch": ["max", 1.1]}),
        "paper": dict(resolution=64, per_class=2000, feature_steps=5000, vae_steps=50_000, unet_steps=200_000,
                      vae_batch_size=128, unet_batch_size=128, lora_steps=5000, controlnet_steps=20_000,
                      addon_batch_size=64, eval_steps=50, eval_per_class=100, serving_steps=50, wait_fraction=0.4,
                      serving_trials=20, quality_seeds=32, compile_backbone=True, gpu=True,
                      gate_thresholds={"lora_style_fd_ratio_max": ["max", 0.9],
                                       "controlnet_edges_edge_f1_gain": ["min", 0.05],
                                       "latency_ratio_cn_cold_lora": ["max", 0.5], "cold_lora_overhead": ["max", 0.05],
                                       "ssim_late_patch": ["min", 0.85], "fd_ratio_late_patch": ["max", 1.1]}),
    },
    "scott": {
        "smoke": dict(per_class=40, feature_steps=100, vae_steps=60, unet_steps=150, trials_per_worker=1,
                      trial_steps=4, trial_rungs=2, sweep_eval_per_class=2, distill_steps=12, distill_batch_size=16,
                      eval_per_class=2,
                      gate_thresholds={"fd": ["max", 1e6], "fd_ratio_vs_teacher": ["max", 1e6],
                                       "cond_acc": ["min", 0.0]}),
        "cpu": dict(per_class=600, feature_steps=1500, vae_steps=2500, unet_steps=8000, trials_per_worker=4,
                    trial_steps=450, trial_rungs=3, sweep_eval_per_class=20, distill_steps=2000, eval_per_class=50,
                    gate_thresholds={"fd": ["max", 50.0], "fd_ratio_vs_teacher": ["max", 1.5],
                                     "cond_acc": ["min", 0.5]}),
        "paper": dict(resolution=64, per_class=5000, feature_steps=5000, vae_steps=50_000, unet_steps=200_000,
                      vae_batch_size=128, unet_batch_size=128, sweep_workers=[0, 1, 2, 3], trials_per_worker=9,
                      trial_steps=4500, trial_rungs=3, sweep_eval_per_class=100, distill_steps=20_000, distill_batch_size=128, eval_per_class=500, gpu=True,
                      gate_thresholds={"fd": ["max", 20.0], "fd_ratio_vs_teacher": ["max", 1.3],
                                       "cond_acc": ["min", 0.8]}),
    },
}


class ParameterError(ValueError):
    pass


def _per_class_fits_sources(p: dict[str, Any]) -> str | None:
    """A dataset built from the raw sources is class-balanced, so per_class cannot exceed their smallest class."""
    from distillery.data.sources import SMALLEST_CLASS

    if p.get("dataset_uri"):
        return None
    sources = p["sources"].split(",")
    limit = min(SMALLEST_CLASS[s] for s in sources)
    if p["per_class"] > limit:
        return (f"per_class {p['per_class']} is more than the {limit} images of the smallest class in sources "
                f"{p['sources']!r}: lower per_class to at most {limit}, choose other sources, or pass a dataset_uri")
    return None


def _scott_headline_rows(p: dict[str, Any]) -> str | None:
    from distillery.papers.scott.evaluate import HEADLINE_STUDENT_STEPS, HEADLINE_TEACHER_STEPS

    missing = [f"{name} must include {k}" for name, k in (("teacher_eval_steps", HEADLINE_TEACHER_STEPS),
                                                          ("student_eval_steps", HEADLINE_STUDENT_STEPS))
               if k not in p[name]]
    return ("; ".join(missing) + " (the headline and the gate compare the student at "
            f"{HEADLINE_STUDENT_STEPS} steps with the teacher at {HEADLINE_TEACHER_STEPS})") if missing else None


def _smdp_durations(p: dict[str, Any]) -> str | None:
    from distillery.papers.smdp_nav import NavConfig

    cfg = NavConfig()
    taus = [p["fixed_tau_short"], p["fixed_tau_mid"], p["fixed_tau_long"]]
    problems = []
    if not cfg.tick <= taus[0] < taus[1] < taus[2]:
        problems.append(f"fixed_tau_short < fixed_tau_mid < fixed_tau_long must hold, each >= the {cfg.tick} s "
                        f"tick; got {taus}")
    if p["min_density"] >= p["max_density"]:
        problems.append(f"min_density {p['min_density']} must be below max_density {p['max_density']}")
    if p["rollout_s"] < cfg.tau_max:
        problems.append(f"rollout_s must be >= the longest duration {cfg.tau_max} s")
    return "; ".join(problems) or None


def _hybrid_splits(p: dict[str, Any]) -> str | None:
    problems = []
    if any(not 0 <= int(k) <= p["eval_steps"] for k in p["splits"]):
        problems.append(f"splits must lie in [0, eval_steps={p['eval_steps']}], got {p['splits']}")
    if p["headline_split"] not in p["splits"]:
        problems.append(f"headline_split {p['headline_split']} must be one of splits {p['splits']}")
    if not set(p["orders"]) <= {"large-small", "small-large"} or "large-small" not in p["orders"]:
        problems.append(f"orders must include large-small (the released order) and may add small-large, "
                        f"got {p['orders']}")
    return "; ".join(problems) or None


def _swift_addons(p: dict[str, Any]) -> str | None:
    from distillery.steps.swift_diffusion import parse_addon

    problems, kinds = [], []
    for a in p["addons"]:
        try:
            kinds.append(parse_addon(a)[0])
        except ValueError as e:
            problems.append(str(e))
    if len(set(p["addons"])) != len(p["addons"]):
        problems.append(f"addons must name each add-on once, got {p['addons']}")
    if not problems and not {"controlnet", "lora"} <= set(kinds):
        problems.append(f"addons must include the ControlNet and at least one LoRA, got {p['addons']}")
    return "; ".join(problems) or None


def _teacher_prior_budgets(p: dict[str, Any]) -> str | None:
    problems = []
    if p["min_episode_length"] > p["episode_steps"]:
        problems.append(f"min_episode_length {p['min_episode_length']} must be <= episode_steps {p['episode_steps']}")
    if any(not 0 <= float(n) <= 10 for n in p["noise_levels"]):
        problems.append(f"noise_levels must lie in [0, 10], got {p['noise_levels']}")
    if float(p["obs_noise"]) not in [float(n) for n in p["noise_levels"]]:
        problems.append(f"noise_levels {p['noise_levels']} must include the training obs_noise {p['obs_noise']} "
                        f"(the gate compares the students with the teacher there)")
    for name in ("teacher_steps", "student_steps", "trial_steps"):
        if p[name] < p["rollout_steps"] * p["num_envs"]:
            problems.append(f"{name} {p[name]} is less than one PPO iteration (rollout_steps x num_envs = "
                            f"{p['rollout_steps'] * p['num_envs']})")
    return "; ".join(problems) or None


# Checks across parameters, run after the per-value constraints; each returns what is wrong or None.
CHECKS: dict[str, list[Callable[[dict[str, Any]], str | None]]] = {
    "tiny-sd": [_per_class_fits_sources],
    "scott": [_per_class_fits_sources, _scott_headline_rows],
    "smdp-nav": [_smdp_durations],
    "hybrid-sd": [_per_class_fits_sources, _hybrid_splits],
    "teacher-prior": [_teacher_prior_budgets],
    "swift-diffusion": [_per_class_fits_sources, _swift_addons],
}


def pipeline_parameters(func: Callable) -> dict[str, inspect.Parameter]:
    fn = getattr(func, "pipeline_func", func)
    return dict(inspect.signature(fn).parameters)


def resolve(pipeline: str, func: Callable, profile: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Profile preset + overrides, type-checked and range-checked; raises ParameterError naming every bad value."""
    profiles = PROFILES.get(pipeline, {})
    if profile not in profiles:
        raise ParameterError(f"unknown profile {profile!r} for {pipeline}; choose one of {sorted(profiles)}")
    params = pipeline_parameters(func)
    unknown = sorted(set(overrides) - set(params))
    if unknown:
        raise ParameterError(f"unknown parameter(s) {unknown} for {pipeline}; valid: {sorted(params)}")
    constraints = CONSTRAINTS.get(pipeline, {})
    fields = {name: (p.annotation, Field(p.default, **constraints.get(name, {}))) for name, p in params.items()}
    model = create_model(f"{pipeline}-params", __config__=ConfigDict(extra="forbid", strict=False), **fields)
    try:
        values = model(**{**profiles[profile], **overrides}).model_dump()
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']} (got {err.get('input')!r})" for err in e.errors())
        raise ParameterError(f"invalid parameters for {pipeline}: {problems}") from None
    problems = [msg for check in CHECKS.get(pipeline, []) if (msg := check(values))]
    if problems:
        raise ParameterError(f"invalid parameters for {pipeline}: {'; '.join(problems)}")
    return values


def parse_set(pairs: list[str]) -> dict[str, Any]:
    """`--set key=value` pairs; values are parsed as JSON where possible (numbers, bools, dicts)."""
    import json

    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ParameterError(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out
