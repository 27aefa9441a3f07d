"""SCott steps: one Optuna study per method (same budget, multi-fidelity with successive halving), distillation
(three methods), the evaluation table and the release of the method that wins it."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from distillery.settings import get_settings
from distillery.steps import checkpoint_dir, dir_hash, evaluator_identity, load_dataset, log_metrics

SEARCH_SPACE = ("noise_strength", "adv_weight", "lr")
# What each method tunes; the rest is fixed by the method (DistillConfig.effective: CD-ODE has no solver noise
# and no adversary, SCott no adversary).
METHOD_KNOBS = {"cd-ode": ("lr",), "scott": ("lr", "noise_strength"), "scott-adv": ("lr", "noise_strength", "adv_weight")}
REDUCTION_FACTOR = 3  # successive halving keeps the best third of the trials at each rung


def _config(**kwargs):
    from distillery.papers.scott import DistillConfig

    return DistillConfig(**kwargs)


def check_search_space(search_space: dict) -> None:
    bad = sorted(set(SEARCH_SPACE) - set(search_space)) + sorted(set(search_space) - set(SEARCH_SPACE))
    if bad or any(len(v) != 2 or not float(v[0]) <= float(v[1]) for v in search_space.values()):
        raise ValueError(f"search_space must map exactly {list(SEARCH_SPACE)} to [low, high], got {search_space}")


def suggest(trial, method: str, search_space: dict) -> dict:
    """The method's knobs proposed by the trial (lr on a log scale when its range is positive)."""
    out = {}
    for knob in METHOD_KNOBS[method]:
        lo, hi = (float(v) for v in search_space[knob])
        out[knob] = trial.suggest_float(knob, lo, hi, log=knob == "lr" and lo > 0)
    return out


def sweep_worker(*, teacher_dir: str, dataset_dir: str, feature_net_dir: str, study_name: str, method: str,
                 worker: int, n_trials: int, search_space: dict, trial_steps: int, trial_rungs: int, batch_size: int,
                 solver_substeps: int, skip: int, guidance_scale: float, discriminator: str, eval_per_class: int,
                 seed: int) -> dict:
    """One worker of `method`'s study (each method its own study, all with the same trials and steps). A trial
    distills with the proposed values and, at each rung (trial_steps / 3^k steps, continuing its own checkpoint),
    reports the student's FD at 2 steps scored by the versioned evaluator; successive halving stops it unless it
    is in the best third of the trials that reached that rung, so the survivors train the full trial_steps."""
    import mlflow
    import optuna
    from diffusers import StableDiffusionPipeline

    from distillery.models import image_eval
    from distillery.papers.scott import METHODS, distill
    from distillery.platform import sweeps, tracking

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if get_settings().devices > 1:  # every rank would propose its own trial inside one DDP run
        raise ValueError("a sweep worker runs in one process: scale a sweep with more workers (sweep_workers), "
                         "not DISTILLERY_DEVICES > 1")
    check_search_space(search_space)
    schedule = sweeps.rungs(trial_steps, trial_rungs, REDUCTION_FACTOR)
    ds = load_dataset(dataset_dir)
    train, holdout = ds.train(), ds.holdout()
    net = image_eval.FeatureNet.load(Path(feature_net_dir))
    base = _config(method=method, steps=trial_steps, batch_size=batch_size, solver_substeps=solver_substeps, skip=skip,
                   guidance_scale=guidance_scale, discriminator=discriminator, seed=seed)

    def objective(trial) -> float:
        cfg = replace(base, **suggest(trial, method, search_space)).effective().check()
        with tempfile.TemporaryDirectory() as tmp:
            student_dir = Path(tmp) / "student"
            for steps in schedule:
                distill(Path(teacher_dir), train, student_dir, replace(cfg, steps=steps),
                        checkpoint_dir=Path(tmp) / "checkpoint", checkpoint_every=trial_steps,
                        log_every=max(1, steps // 5))
                pipe = StableDiffusionPipeline.from_pretrained(student_dir, use_safetensors=True)
                result = image_eval.evaluate_text_to_image(pipe, holdout, net, num_per_class=eval_per_class, steps=2,
                                                           guidance_scale=1.0, seed=seed, latency_probes=1)
                mlflow.log_metrics({k: result[k] for k in ("fd", "fd_ci_low", "fd_ci_high", "cond_acc")}, step=steps)
                trial.report(float(result["fd"]), steps)
                if steps < trial_steps and trial.should_prune():
                    tracking.log_image(result.pop("grid"), "samples_2step.png")
                    raise optuna.TrialPruned(f"FD {result['fd']:.3f} at {steps} steps")
        tracking.log_image(result.pop("grid"), "samples_2step.png")
        return float(result["fd"])

    out = sweeps.run_worker(study_name, objective, n_trials, pipeline="scott", direction="minimize",
                            sampler_seed=seed * 1000 + int(worker),
                            pruner=sweeps.successive_halving(schedule[0], REDUCTION_FACTOR))
    return {"trials_in_study": float(out["trials"]), "finished_here": float(out["finished_here"]),
            "pruned_in_study": float(out["pruned"]), "best_value": out["best_value"], "best_params": out["best_params"]}


def select_best(*, results: list, method: str) -> dict:
    """The best trial of `method`'s study over all workers' reports (each a JSON {"best_value", "best_params"}),
    with the knobs the method does not tune set to what it fixes them to."""
    from distillery.papers.scott import METHODS

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    reports = [json.loads(r) if isinstance(r, str) else r for r in results]
    done = [r for r in reports if r.get("best_value") is not None and r.get("best_params")]
    if not done:
        raise RuntimeError(f"no {method} sweep trial completed ({len(reports)} workers reported); see the trial runs "
                           f"in MLflow")
    best = min(done, key=lambda r: float(r["best_value"]))
    from distillery.platform import tracking

    tracking.log_dict(best, "best_trial.json")
    fixed = _config(method=method).effective()
    params = {k: float(best["best_params"][k] if k in METHOD_KNOBS[method] else getattr(fixed, k)) for k in SEARCH_SPACE}
    return {"best_value": float(best["best_value"]), **params}


def distill(*, teacher_dir: str, dataset_dir: str, out_dir: str, method: str, steps: int, batch_size: int, lr: float,
            noise_strength: float, adv_weight: float, solver_substeps: int, skip: int, guidance_scale: float,
            discriminator: str, seed: int) -> dict:
    from distillery.papers import scott

    ds = load_dataset(dataset_dir)
    cfg = _config(method=method, steps=steps, batch_size=batch_size, lr=lr, noise_strength=noise_strength,
                  adv_weight=adv_weight, solver_substeps=solver_substeps, skip=skip, guidance_scale=guidance_scale,
                  discriminator=discriminator, seed=seed).effective()
    ckpt = checkpoint_dir(f"distill-{method}", data=ds.manifest["content_sha256"], teacher=dir_hash(Path(teacher_dir)),
                          cfg=cfg)
    return scott.distill(Path(teacher_dir), ds.train(), Path(out_dir), cfg, checkpoint_dir=ckpt, on_log=log_metrics)


def evaluate(*, teacher_dir: str, students: dict, dataset_dir: str, feature_net_dir: str, teacher_steps: list,
             student_steps: list, num_per_class: int, guidance_scale: float, seed: int, table_path: str,
             released_dir: str) -> dict:
    """The paper's table on held-out prompts with fixed seeds; metrics for every row. The student with the best
    FD at 2 steps (the gate's metric) is the release: its headline is returned and its folder copied to
    `released_dir`."""
    import mlflow

    from distillery.models import image_eval
    from distillery.papers.scott import evaluate as ev
    from distillery.platform import tracking

    ds = load_dataset(dataset_dir)
    net = image_eval.FeatureNet.load(Path(feature_net_dir))
    models = {"teacher": (Path(teacher_dir), guidance_scale), **{k: (Path(v), 1.0) for k, v in students.items()}}
    steps = {"teacher": [int(s) for s in teacher_steps], **{k: [int(s) for s in student_steps] for k in students}}
    rows, grids = ev.evaluation_table(models, steps, ds.holdout(), net, num_per_class=num_per_class, seed=seed)
    for key, grid in grids.items():
        tracking.log_image(grid, f"samples/{key}.png")
    mlflow.log_table({k: [r[k] for r in rows] for k in rows[0]}, "evaluation_table.json")
    tracking.log_figure(ev.plot(rows), "fd_vs_steps.png")
    table = ev.markdown(rows)
    Path(table_path).write_text("# SCott evaluation\n\n" + table)
    mlflow.log_text(table, "evaluation_table.md")
    metrics = {f"{ev.row_key(r['model'], r['steps'])}_{m}": r[m] for r in rows for m in ev.ROW_METRICS}
    winner = ev.pick_winner(rows, list(students))
    mlflow.set_tag("released_method", winner)
    shutil.copytree(students[winner], released_dir, dirs_exist_ok=True)
    return {**metrics, **ev.headline(rows, winner), **evaluator_identity(feature_net_dir), "released_method": winner}
