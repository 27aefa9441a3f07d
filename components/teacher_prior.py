"""Components of teacher-prior: environment, teacher, rollouts and their validation, sweep, students, evaluation."""

from typing import NamedTuple

from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

from components import component


@component
def locomotion_env(
    episode_steps: int,
    terrain_height: float,
    push_force: float,
    obs_noise: float,
    history: int,
    heights_ahead: int,
    pipeline: str,
    kfp_run_id: str,
    env: Output[Dataset],
    metrics: Output[Metrics],
):
    from distillery.platform.stepping import run_step
    from distillery.steps import teacher_prior

    run_step(teacher_prior.env_config, pipeline=pipeline, step="env", kfp_run_id=kfp_run_id, kfp_metrics=metrics,
             out_dir=env.path, episode_steps=episode_steps, terrain_height=terrain_height, push_force=push_force,
             obs_noise=obs_noise, history=history, heights_ahead=heights_ahead)


@component
def train_teacher(
    env: Input[Dataset],
    env_steps: int,
    rollout_steps: int,
    num_envs: int,
    lr: float,
    hidden: int,
    seed: int,
    pipeline: str,
    kfp_run_id: str,
    teacher: Output[Model],
    metrics: Output[Metrics],
):
    from distillery.platform.stepping import run_step
    from distillery.steps import teacher_prior

    run_step(teacher_prior.train_teacher, pipeline=pipeline, step="teacher", kfp_run_id=kfp_run_id,
             kfp_metrics=metrics, env_dir=env.path, out_dir=teacher.path, env_steps=env_steps,
             rollout_steps=rollout_steps, num_envs=num_envs, lr=lr, hidden=hidden, seed=seed)


@component
def teacher_rollouts(
    env: Input[Dataset],
    teacher: Input[Model],
    episodes: int,
    seed: int,
    pipeline: str,
    kfp_run_id: str,
    rollouts: Output[Dataset],
    metrics: Output[Metrics],
):
    from distillery.platform.stepping import run_step
    from distillery.steps import teacher_prior

    run_step(teacher_prior.teacher_rollouts, pipeline=pipeline, step="rollouts", kfp_run_id=kfp_run_id,
             kfp_metrics=metrics, env_dir=env.path, teacher_dir=teacher.path, out_dir=rollouts.path,
             episodes=episodes, seed=seed)


@component
def validate_rollouts(
    rollouts: Input[Dataset],
    min_length: int,
    pipeline: str,
    kfp_run_id: str,
    report: Output[HTML],
    metrics: Output[Metrics],
):
    from distillery.platform.stepping import run_step
    from distillery.steps import teacher_prior

    run_step(teacher_prior.validate_rollouts, pipeline=pipeline, step="validate", kfp_run_id=kfp_run_id,
             kfp_metrics=metrics, rollouts_dir=rollouts.path, report_path=report.path, min_length=min_length)


@component
def sweep_prior_weights(
    env: Input[Dataset],
    rollouts: Input[Dataset],
    worker: int,
    n_trials: int,
    trial_steps: int,
    rollout_steps: int,
    num_envs: int,
    lr: float,
    hidden: int,
    eval_episodes: int,
    seed: int,
    pipeline: str,
    kfp_run_id: str,
    metrics: Output[Metrics],
) -> str:
    import json

    from distillery.platform.stepping import run_step
    from distillery.steps import teacher_prior

    # Every worker of one pipeline run shares the study: its name is the run's.
    result = run_step(teacher_prior.sweep_worker, pipeline=pipeline, step=f"sweep-{worker}", kfp_run_id=kfp_run_id,
                      kfp_metrics=metrics, env_dir=env.path, rollouts_dir=rollouts.path,
                      study_name=f"teacher-prior-sweep-{kfp_run_id}", worker=worker, n_trials=n_trials,
                      trial_steps=trial_steps, rollout_steps=rollout_steps, num_envs=num_envs, lr=lr, hidden=hidden,
                      eval_episodes=eval_episodes, seed=seed)
    return json.dumps({"best_value": result["best_value"], "best_params": result["best_params"]})


@component
def select_prior_weights(
    results: list,
    pipeline: str,
    kfp_run_id: str,
) -> NamedTuple("Best", w_style=float, c_aux=float):
    from typing import NamedTuple

    from distillery.platform.stepping import run_step
    from distillery.steps import teacher_prior

    best = run_step(teacher_prior.select_best, pipeline=pipeline, step="select-best", kfp_run_id=kfp_run_id,
                    results=results)
    Best = NamedTuple("Best", w_style=float, c_aux=float)
    return Best(best["w_style"], best["c_aux"])


@component
def train_student(
    env: Input[Dataset],
    rollouts: Input[Dataset],
    teacher: Input[Model],
    variant: str,
    env_steps: int,
    rollout_steps: int,
    num_envs: int,
    lr: float,
    hidden: int,
    w_style: float,
    c_aux: float,
    seed: int,
    pipeline: str,
    kfp_run_id: str,
    student: Output[Model],
    metrics: Output[Metrics],
):
    from distillery.platform.stepping import run_step
    from distillery.steps import teacher_prior

    run_step(teacher_prior.train_student, pipeline=pipeline, step=f"student-{variant}", kfp_run_id=kfp_run_id,
             kfp_metrics=metrics, env_dir=env.path, rollouts_dir=rollouts.path, teacher_dir=teacher.path,
             out_dir=student.path, variant=variant, env_steps=env_steps, rollout_steps=rollout_steps,
             num_envs=num_envs, lr=lr, hidden=hidden, w_style=w_style, c_aux=c_aux, seed=seed)


@component
def evaluate_locomotion(
    env: Input[Dataset],
    teacher: Input[Model],
    method: Input[Model],
    no_aux: Input[Model],
    no_disc: Input[Model],
    dagger: Input[Model],
    bc: Input[Model],
    scratch: Input[Model],
    episodes: int,
    noise_levels: list,
    wide_factor: float,
    render: bool,
    pipeline: str,
    kfp_run_id: str,
    table: Output[Markdown],
    metrics: Output[Metrics],
):
    from distillery.platform.stepping import run_step
    from distillery.steps import teacher_prior

    dirs = {"method": method.path, "no-aux": no_aux.path, "no-disc": no_disc.path, "dagger": dagger.path,
            "bc": bc.path, "scratch": scratch.path}
    run_step(teacher_prior.evaluate, pipeline=pipeline, step="evaluate", kfp_run_id=kfp_run_id, kfp_metrics=metrics,
             env_dir=env.path, teacher_dir=teacher.path, student_dirs=dirs, episodes=episodes,
             noise_levels=noise_levels, wide_factor=wide_factor, table_path=table.path, render=render)
