"""SCott steps: the Optuna sweep over SCott's knobs, distillation (three methods), the evaluation table."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from distillery.steps import checkpoint_dir, dir_hash, evaluator_identity, load_dataset, log_metrics

SEARCH_SPACE = ("noise_strength", "adv_weight", "lr")


def _config(**kwargs):
    from distillery.papers.scott import DistillConfig

    return DistillConfig(**kwargs)


def sweep_worker(*, teacher_dir: str, dataset_dir: str, feature_net_dir: str, study_name: str, worker: int,
                 n_trials: int, search_space: dict, trial_steps: int, batch_size: int, solver_substeps: int, skip: int,
                 guidance_scale: float, eval_per_class: int, seed: int) -> dict:
    """One worker of the shared study: each trial distills SCott+adversarial briefly with proposed noise strength,
    adversarial weight and learning rate and returns the student's FD at 2 steps (lower is better)."""
    import mlflow
    from diffusers import StableDiffusionPipeline

    from distillery.models import image_eval
    from distillery.papers.scott import distill
    from distillery.platform import sweeps, tracking

    bad = sorted(set(SEARCH_SPACE) - set(search_space)) + sorted(set(search_space) - set(SEARCH_SPACE))
    if bad or any(len(v) != 2 or not float(v[0]) <= float(v[1]) for v in search_space.values()):
        raise ValueError(f"search_space must map exactly {list(SEARCH_SPACE)} to [low, high], got {search_space}")
    ds = load_dataset(dataset_dir)
    train, holdout = ds.train(), ds.holdout()
    net = image_eval.FeatureNet.load(Path(feature_net_dir))

    def objective(trial) -> float:
        lo_lr, hi_lr = (float(v) for v in search_space["lr"])
        cfg = _config(method="scott-adv", steps=trial_steps, batch_size=batch_size, solver_substeps=solver_substeps,
                      skip=skip, guidance_scale=guidance_scale, seed=seed,
                      noise_strength=trial.suggest_float("noise_strength", *map(float, search_space["noise_strength"])),
                      adv_weight=trial.suggest_float("adv_weight", *map(float, search_space["adv_weight"])),
                      lr=trial.suggest_float("lr", lo_lr, hi_lr, log=lo_lr > 0))
        with tempfile.TemporaryDirectory() as student_dir:
            distill(Path(teacher_dir), train, Path(student_dir), cfg, log_every=max(1, trial_steps // 5))
            pipe = StableDiffusionPipeline.from_pretrained(student_dir, use_safetensors=True)
            result = image_eval.evaluate_text_to_image(pipe, holdout, net, num_per_class=eval_per_class, steps=2,
                                                       guidance_scale=1.0, seed=seed)
        tracking.log_image(result.pop("grid"), "samples_2step.png")
        mlflow.log_metrics({"fd": result["fd"], "cond_acc": result["cond_acc"]})
        return float(result["fd"])

    out = sweeps.run_worker(study_name, objective, n_trials, pipeline="scott", direction="minimize",
                            sampler_seed=seed * 1000 + int(worker))
    return {"trials_in_study": float(out["trials"]), "finished_here": float(out["finished_here"]),
            "best_value": out["best_value"], "best_params": out["best_params"]}


def select_best(*, results: list) -> dict:
    """The best trial over all workers' reports (each a JSON {"best_value", "best_params"})."""
    reports = [json.loads(r) if isinstance(r, str) else r for r in results]
    done = [r for r in reports if r.get("best_value") is not None and r.get("best_params")]
    if not done:
        raise RuntimeError(f"no sweep trial completed ({len(reports)} workers reported); see the trial runs in MLflow")
    best = min(done, key=lambda r: float(r["best_value"]))
    from distillery.platform import tracking

    tracking.log_dict(best, "best_trial.json")
    return {"best_value": float(best["best_value"]), **{k: float(v) for k, v in best["best_params"].items()}}


def distill(*, teacher_dir: str, dataset_dir: str, out_dir: str, method: str, steps: int, batch_size: int, lr: float,
            noise_strength: float, adv_weight: float, solver_substeps: int, skip: int, guidance_scale: float,
            seed: int) -> dict:
    from distillery.papers import scott

    ds = load_dataset(dataset_dir)
    cfg = _config(method=method, steps=steps, batch_size=batch_size, lr=lr, noise_strength=noise_strength,
                  adv_weight=adv_weight, solver_substeps=solver_substeps, skip=skip, guidance_scale=guidance_scale,
                  seed=seed).effective()
    ckpt = checkpoint_dir(f"distill-{method}", data=ds.manifest["content_sha256"], teacher=dir_hash(Path(teacher_dir)),
                          cfg=cfg)
    return scott.distill(Path(teacher_dir), ds.train(), Path(out_dir), cfg, checkpoint_dir=ckpt, on_log=log_metrics)


def evaluate(*, teacher_dir: str, students: dict, dataset_dir: str, feature_net_dir: str, teacher_steps: list,
             student_steps: list, num_per_class: int, guidance_scale: float, candidate: str, seed: int,
             table_path: str) -> dict:
    """The paper's table on held-out prompts with fixed seeds; metrics for every row plus the candidate's headline."""
    import mlflow

    from distillery.models import image_eval
    from distillery.papers.scott import evaluate as ev
    from distillery.platform import tracking

    if candidate not in students:
        raise ValueError(f"candidate {candidate!r} is not one of the students {sorted(students)}")
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
    return {**metrics, **ev.headline(rows, candidate), **evaluator_identity(feature_net_dir)}
