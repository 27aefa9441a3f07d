"""Components of SCott: a sweep worker of one method's study, its best trial, distillation, the evaluation table
(which releases the winning student)."""

from typing import NamedTuple

from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output

from components import component


@component
def sweep_worker(
    teacher: Input[Model],
    dataset: Input[Dataset],
    feature_net: Input[Model],
    method: str,
    worker: int,
    n_trials: int,
    search_space: dict,
    trial_steps: int,
    trial_rungs: int,
    batch_size: int,
    solver_substeps: int,
    skip: int,
    guidance_scale: float,
    discriminator: str,
    eval_per_class: int,
    seed: int,
    pipeline: str,
    kfp_run_id: str,
    metrics: Output[Metrics],
) -> str:
    import json

    from distillery.platform.stepping import run_step
    from distillery.steps import scott

    # All workers of one pipeline run share the method's study: its name is the run's and the method's.
    result = run_step(scott.sweep_worker, pipeline=pipeline, step=f"sweep-{method}-{worker}", kfp_run_id=kfp_run_id,
                      kfp_metrics=metrics, teacher_dir=teacher.path, dataset_dir=dataset.path,
                      feature_net_dir=feature_net.path, study_name=f"scott-sweep-{kfp_run_id}-{method}", method=method,
                      worker=worker, n_trials=n_trials, search_space=search_space, trial_steps=trial_steps,
                      trial_rungs=trial_rungs, batch_size=batch_size, solver_substeps=solver_substeps, skip=skip,
                      guidance_scale=guidance_scale, discriminator=discriminator, eval_per_class=eval_per_class,
                      seed=seed)
    return json.dumps({"best_value": result["best_value"], "best_params": result["best_params"]})


@component
def select_best(
    results: list,
    method: str,
    pipeline: str,
    kfp_run_id: str,
) -> NamedTuple("Best", noise_strength=float, adv_weight=float, lr=float):
    from typing import NamedTuple

    from distillery.platform.stepping import run_step
    from distillery.steps import scott

    best = run_step(scott.select_best, pipeline=pipeline, step=f"select-best-{method}", kfp_run_id=kfp_run_id,
                    results=results, method=method)
    Best = NamedTuple("Best", noise_strength=float, adv_weight=float, lr=float)
    return Best(best["noise_strength"], best["adv_weight"], best["lr"])


@component
def distill(
    teacher: Input[Model],
    dataset: Input[Dataset],
    method: str,
    steps: int,
    batch_size: int,
    lr: float,
    noise_strength: float,
    adv_weight: float,
    solver_substeps: int,
    skip: int,
    guidance_scale: float,
    discriminator: str,
    seed: int,
    pipeline: str,
    kfp_run_id: str,
    student: Output[Model],
    metrics: Output[Metrics],
):
    from distillery.platform.stepping import run_step
    from distillery.steps import scott

    run_step(scott.distill, pipeline=pipeline, step=f"distill-{method}", kfp_run_id=kfp_run_id, kfp_metrics=metrics,
             teacher_dir=teacher.path, dataset_dir=dataset.path, out_dir=student.path, method=method, steps=steps,
             batch_size=batch_size, lr=lr, noise_strength=noise_strength, adv_weight=adv_weight,
             solver_substeps=solver_substeps, skip=skip, guidance_scale=guidance_scale, discriminator=discriminator,
             seed=seed)


@component
def evaluate_students(
    teacher: Input[Model],
    cd_ode: Input[Model],
    scott: Input[Model],
    scott_adv: Input[Model],
    dataset: Input[Dataset],
    feature_net: Input[Model],
    teacher_steps: list,
    student_steps: list,
    num_per_class: int,
    guidance_scale: float,
    seed: int,
    pipeline: str,
    kfp_run_id: str,
    table: Output[Markdown],
    metrics: Output[Metrics],
    released: Output[Model],
) -> str:
    from distillery.platform.stepping import run_step
    from distillery.steps import scott as steps

    result = run_step(steps.evaluate, pipeline=pipeline, step="evaluate", kfp_run_id=kfp_run_id, kfp_metrics=metrics,
                      teacher_dir=teacher.path,
                      students={"cd-ode": cd_ode.path, "scott": scott.path, "scott-adv": scott_adv.path},
                      dataset_dir=dataset.path, feature_net_dir=feature_net.path, teacher_steps=teacher_steps,
                      student_steps=student_steps, num_per_class=num_per_class, guidance_scale=guidance_scale,
                      seed=seed, table_path=table.path, released_dir=released.path)
    return result["released_method"]
