"""teacher-prior steps: the environment configuration, the privileged teacher, its rollouts and their validation,
the sweep of the style-reward and auxiliary weights, the students, the evaluation under noise and terrain."""

from __future__ import annotations

import json
from pathlib import Path

from distillery.steps import checkpoint_dir, dir_hash, log_metrics
from distillery.steps.data import enforce_validation

ENV_FILE = "env.json"


def _env(env_dir: str):
    from distillery.papers.teacher_prior import TerrainConfig

    path = Path(env_dir) / ENV_FILE
    if not path.exists():
        raise FileNotFoundError(f"{env_dir} holds no environment configuration ({ENV_FILE} missing)")
    return TerrainConfig.from_dict(json.loads(path.read_text())["terrain_config"])


def env_config(*, out_dir: str, episode_steps: int, terrain_height: float, push_force: float, obs_noise: float,
               history: int, heights_ahead: int) -> dict:
    """The environment every later step builds: terrain, randomization ranges, the student's noise and history.
    Its content hash is the run's data revision (the pipeline generates its data, there is no dataset)."""
    from distillery.papers.teacher_prior import TerrainConfig
    from distillery.platform import tracking, versioning

    cfg = TerrainConfig(episode_steps=episode_steps, terrain_height=terrain_height, push_force=push_force,
                        obs_noise=obs_noise, history=history, heights_ahead=heights_ahead).check()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"terrain_config": cfg.as_dict(), "student_dim": cfg.student_dim, "teacher_dim": cfg.teacher_dim,
                "privileged_dim": cfg.privileged_dim, "simulator": "gymnasium Walker2d-v5 (MuJoCo) on a heightfield"}
    (out / ENV_FILE).write_text(json.dumps(manifest, indent=1))
    digest = versioning.content_hash(out)
    tracking.set_data_revision(digest, digest, dataset="teacher-prior-env")
    tracking.log_dict(manifest, ENV_FILE)
    return {"student_dim": float(cfg.student_dim), "teacher_dim": float(cfg.teacher_dim)}


def _ppo(num_envs: int, lr: float, hidden: int):
    from distillery.rl.ppo import PPOConfig

    return PPOConfig(lr=lr, num_envs=num_envs, hidden=hidden)


def train_teacher(*, env_dir: str, out_dir: str, env_steps: int, rollout_steps: int, num_envs: int, lr: float,
                  hidden: int, seed: int) -> dict:
    """PPO with privileged observations (terrain ahead, physical parameters, true velocity, foot contacts)."""
    from distillery.papers.teacher_prior import train_ppo

    cfg, ppo = _env(env_dir), _ppo(num_envs, lr, hidden)
    ckpt = checkpoint_dir("train-teacher", env=cfg, ppo=ppo, steps=env_steps, rollout=rollout_steps, seed=seed)
    return train_ppo(Path(out_dir), cfg, ppo, role="teacher", env_steps=env_steps, rollout_steps=rollout_steps,
                     seed=seed, checkpoint_dir=ckpt, on_log=log_metrics)


def teacher_rollouts(*, env_dir: str, teacher_dir: str, out_dir: str, episodes: int, seed: int) -> dict:
    """The teacher's motion as the student would sense it (noisy proprioception), with the auxiliary targets."""
    import numpy as np

    from distillery.papers.teacher_prior import rollouts as R
    from distillery.papers.teacher_prior.policy import load_policy
    from distillery.platform import tracking

    cfg = _env(env_dir)
    teacher = load_policy(Path(teacher_dir), role="teacher")
    if teacher.cfg.teacher_dim != cfg.teacher_dim:  # an imported teacher of another environment
        raise ValueError(f"the teacher takes {teacher.cfg.teacher_dim} privileged observations, this environment gives "
                         f"{cfg.teacher_dim} (heights_ahead differs); train one here or import a matching one")
    arrays = R.collect(teacher, cfg, episodes, seed=seed)
    manifest = R.save(arrays, Path(out_dir), cfg, seed=seed, teacher=dir_hash(Path(teacher_dir)))
    tracking.log_dict(manifest, "manifest.json")
    return {"transitions": float(manifest["transitions"]), "episodes": float(manifest["episodes"]),
            "teacher_return": float(np.mean(arrays["ep_return"])), "teacher_fall_rate": float(np.mean(arrays["ep_fell"])),
            "teacher_episode_length": float(np.mean(arrays["ep_length"]))}


def validate_rollouts(*, rollouts_dir: str, report_path: str, min_length: int) -> dict:
    """Great Expectations over the rollouts (feature ranges, episode lengths, no NaN); a failure stops the DAG
    here naming every failed expectation."""
    from distillery.papers.teacher_prior import TerrainConfig
    from distillery.papers.teacher_prior import rollouts as R

    arrays, manifest = R.load(Path(rollouts_dir))
    cfg = TerrainConfig.from_dict(manifest["terrain_config"])
    return enforce_validation(R.validate(arrays, cfg, Path(report_path), min_length=min_length), report_path)


# w_task = 1 - w_style; c_aux log-uniform. The task keeps at least 0.4 of the reward (AMP's task-driven setting is
# 0.5 / 0.5): short trials cannot tell a style-dominated reward from a good one, and a sweep that picked
# w_style 0.86 from 100k-step trials gave a student that traded walking for style (0.26x the teacher).
SEARCH_SPACE = {"w_style": (0.1, 0.6), "c_aux": (0.01, 2.0)}


def sweep_worker(*, env_dir: str, rollouts_dir: str, study_name: str, worker: int, n_trials: int, trial_steps: int,
                 rollout_steps: int, num_envs: int, lr: float, hidden: int, eval_episodes: int, seed: int) -> dict:
    """One worker of the study over the style-reward weight (w_task = 1 - w_style) and the auxiliary weight: a trial
    trains the method student for trial_steps environment steps and scores its mean return on validation terrain
    (VALID_SEEDS: neither trained on nor in the held-out evaluation, whose seeds the trials once shared) under the
    training noise. Workers share the study by name and each seeds its own sampler."""
    import tempfile

    import mlflow

    from distillery.papers.teacher_prior import PriorConfig, train_ppo
    from distillery.papers.teacher_prior import evaluate as ev
    from distillery.papers.teacher_prior.train import VALID_SEEDS
    from distillery.papers.teacher_prior import rollouts as R
    from distillery.papers.teacher_prior.policy import load_policy
    from distillery.platform import sweeps
    from distillery.settings import get_settings

    if get_settings().devices > 1:
        raise ValueError("a sweep worker runs in one process: scale a sweep with more workers (sweep_workers)")
    cfg, ppo = _env(env_dir), _ppo(num_envs, lr, hidden)
    arrays, _ = R.load(Path(rollouts_dir))

    def objective(trial) -> float:
        w_style = trial.suggest_float("w_style", *SEARCH_SPACE["w_style"])
        c_aux = trial.suggest_float("c_aux", *SEARCH_SPACE["c_aux"], log=True)
        with tempfile.TemporaryDirectory() as tmp:
            m = train_ppo(Path(tmp) / "student", cfg, ppo, role="method", env_steps=trial_steps,
                          rollout_steps=rollout_steps, seed=seed, rollouts=arrays,
                          pc=PriorConfig(w_task=1 - w_style, w_style=w_style, c_aux=c_aux))
            s = ev.summarize(ev.run_episodes(load_policy(Path(tmp) / "student"), cfg, eval_episodes, cfg.obs_noise,
                                             seed=1 + worker, terrain_seeds=VALID_SEEDS))
        mlflow.log_metrics({"eval_return": s["return"], "eval_fall_rate": s["fall_rate"],
                            **{k: v for k, v in m.items() if k.startswith("final_disc") or k == "final_aux_mse"}})
        return s["return"]

    out = sweeps.run_worker(study_name, objective, n_trials, pipeline="teacher-prior", direction="maximize",
                            sampler_seed=seed * 1000 + int(worker))
    return {"trials_in_study": float(out["trials"]), "finished_here": float(out["finished_here"]),
            "best_value": out["best_value"], "best_params": out["best_params"]}


def select_best(*, results: list) -> dict:
    """The best trial over every worker's report (JSON {"best_value", "best_params"})."""
    from distillery.platform import tracking

    reports = [json.loads(r) if isinstance(r, str) else r for r in results]
    done = [r for r in reports if r.get("best_value") is not None and r.get("best_params")]
    if not done:
        raise RuntimeError(f"no sweep trial completed ({len(reports)} workers reported); see the trial runs in MLflow")
    best = max(done, key=lambda r: float(r["best_value"]))
    tracking.log_dict(best, "best_trial.json")
    return {"best_value": float(best["best_value"]), "w_style": float(best["best_params"]["w_style"]),
            "c_aux": float(best["best_params"]["c_aux"])}


def train_student(*, env_dir: str, rollouts_dir: str, teacher_dir: str, out_dir: str, variant: str, env_steps: int,
                  rollout_steps: int, num_envs: int, lr: float, hidden: int, w_style: float, c_aux: float,
                  seed: int) -> dict:
    """One student (method, no-aux, no-disc, scratch by PPO; dagger and bc from the teacher), all from the same
    seed."""
    from distillery.papers.teacher_prior import IMITATION, VARIANTS, PriorConfig, train_dagger, train_ppo
    from distillery.papers.teacher_prior import rollouts as R

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    cfg, ppo = _env(env_dir), _ppo(num_envs, lr, hidden)
    pc = PriorConfig(w_task=1 - w_style, w_style=w_style, c_aux=c_aux).check()
    arrays, manifest = R.load(Path(rollouts_dir))
    ckpt = checkpoint_dir(f"student-{variant}", env=cfg, ppo=ppo, pc=pc, rollouts=manifest["content_sha256"],
                          teacher=dir_hash(Path(teacher_dir)), steps=env_steps, rollout=rollout_steps, seed=seed)
    if variant in IMITATION:
        return train_dagger(Path(out_dir), cfg, Path(teacher_dir), hidden=hidden, env_steps=env_steps,
                            rollout_steps=rollout_steps, num_envs=num_envs, seed=seed, pc=pc, checkpoint_dir=ckpt,
                            on_log=log_metrics, role=variant)
    return train_ppo(Path(out_dir), cfg, ppo, role=variant, env_steps=env_steps, rollout_steps=rollout_steps, seed=seed,
                     pc=pc, rollouts=arrays, checkpoint_dir=ckpt, on_log=log_metrics)


def evaluate(*, env_dir: str, teacher_dir: str, student_dirs: dict[str, str], episodes: int, noise_levels: list,
             wide_factor: float, table_path: str, render: bool) -> dict:
    """Every policy on held-out terrain seeds: at the training randomization under each observation-noise level,
    and at randomization `wide_factor` times wider under the training noise. The gate's numbers are the method
    student's; the comparisons of the issue's targets are returned beside them."""
    import os

    os.environ.setdefault("MUJOCO_GL", "egl")  # before MuJoCo is imported: frames render headless
    import mlflow
    import numpy as np
    import torch

    from distillery.papers.teacher_prior import evaluate as ev
    from distillery.papers.teacher_prior.policy import load_policy
    from distillery.platform import tracking

    torch.set_num_threads(1)  # batch-of-a-few MLP calls between MuJoCo steps
    cfg = _env(env_dir)
    if not noise_levels or any(float(n) < 0 for n in noise_levels) or wide_factor < 1:
        raise ValueError(f"need noise levels >= 0 and wide_factor >= 1, got {noise_levels} and {wide_factor}")
    policies = {"teacher": load_policy(Path(teacher_dir), role="teacher")}
    policies.update({name: load_policy(Path(p)) for name, p in student_dirs.items()})
    conditions = {f"noise{float(n):g}": (cfg, float(n)) for n in noise_levels}
    conditions["wide"] = (cfg.widened(wide_factor), cfg.obs_noise)
    summary: dict[str, dict] = {}
    train_noise = f"noise{cfg.obs_noise:g}"
    for name, p in policies.items():
        for cond, (c, noise) in conditions.items():
            # The teacher sees clean privileged observations: one noise level says all about it.
            if name == "teacher" and cond.startswith("noise") and noise != cfg.obs_noise:
                continue
            summary[f"{name}/{cond}"] = ev.summarize(ev.run_episodes(p, c, episodes, noise, seed=0))
    method, teacher = summary[f"method/{train_noise}"], summary[f"teacher/{train_noise}"]
    metrics = {}
    for key, s in summary.items():
        name, cond = key.split("/")
        # Per-target R^2 only at the training noise; the mean R^2 everywhere.
        metrics.update({f"{name.replace('-', '_')}_{cond.replace('.', 'p')}_{k}": v for k, v in s.items()
                        if np.isfinite(v) and (cond == train_noise or not k.startswith("aux_r2_"))})
    curves = {n: p.meta["curve"] for n, p in policies.items()}
    steps80 = {n: ev.steps_to_fraction(c) for n, c in curves.items()}
    metrics.update({
        "return": method["return"], "fall_rate": method["fall_rate"],
        "return_ratio_vs_teacher": method["return"] / max(teacher["return"], 1e-9),
        "onnx_max_abs_diff": float(policies["method"].meta["onnx_max_abs_diff"]),
        **{f"{n.replace('-', '_')}_steps_to_80pct": v for n, v in steps80.items() if np.isfinite(v)},
    })
    if "aux_r2" in method:
        metrics["aux_r2"] = method["aux_r2"]
    # Against both imitation students: DAgger (the usual distillation) and plain behaviour cloning, whose
    # distribution shift is what the paper's adversarial prior is meant to avoid.
    for name in ("dagger", "bc"):
        if (other := summary.get(f"{name}/{train_noise}")) is not None:
            metrics[f"return_ratio_vs_{name}"] = method["return"] / max(other["return"], 1e-9)
            metrics[f"fall_ratio_vs_{name}"] = method["fall_rate"] / max(other["fall_rate"], 1e-9)
    if "no-aux" in policies and np.isfinite(steps80["no-aux"]):
        metrics["steps_to_80pct_ratio_vs_no_aux"] = steps80["method"] / max(steps80["no-aux"], 1.0)
        # Each curve to 80% of its own final favours a student that plateaus low; the same bar for both (80% of
        # the no-auxiliary student's final return) says which one gets there sooner.
        bar = ev.steps_to_fraction(curves["method"], 0.8, final=ev.final_value(curves["no-aux"]))
        metrics["method_steps_to_no_aux_80pct"] = bar
        metrics["steps_to_no_aux_80pct_ratio"] = bar / max(steps80["no-aux"], 1.0)
    # Discriminator accuracy over training: one that wins outright zeroes the style reward.
    for name, p in policies.items():
        dc = p.meta.get("disc_curve") or []
        for step, acc, style in dc:
            mlflow.log_metrics({f"{name.replace('-', '_')}_disc_accuracy": acc,
                                f"{name.replace('-', '_')}_style_reward": style}, step=int(step))
        if dc:
            metrics[f"{name.replace('-', '_')}_final_disc_accuracy"] = float(dc[-1][1])
    tracking.log_figure(ev.learning_curves_figure(curves, "mean training episode return"), "learning_curves.png")
    if render:
        strips, reason = {}, ""
        for name, p in policies.items():
            strip, reason = ev.frame_strip(p, cfg)
            if strip is None:
                break
            strips[name] = strip
        if strips and not reason:
            tracking.log_figure(ev.strips_figure(strips), "frame_strips.png")
        else:
            mlflow.set_tag("frame_strips_skipped", reason)
    cols = ["return", "return_ci", "fall_rate", "fall_rate_ci", "distance", "tracking_error", "aux_r2"]
    lines = ["| policy | condition | " + " | ".join(cols) + " |", "|---|---|" + "---:|" * len(cols)]
    lines += [f"| {k.split('/')[0]} | {k.split('/')[1]} | " + " | ".join(f"{s.get(c, float('nan')):.3g}" for c in cols)
              + " |" for k, s in summary.items()]
    lines += ["", "| policy | env steps to 80% of final training return |", "|---|---:|"]
    lines += [f"| {n} | {v:.0f} |" for n, v in steps80.items() if np.isfinite(v)]
    Path(table_path).write_text("# teacher-prior evaluation (held-out terrain)\n\n" + "\n".join(lines) + "\n")
    mlflow.log_text("\n".join(lines), "evaluation_table.md")
    tracking.log_dict(summary, "evaluation.json")
    return metrics
