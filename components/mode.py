"""Components of MoDE: demonstrations, their validation, policy training, closed-loop evaluation."""

from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

from components import component


@component
def collect_demos(
    episodes_per_task: int,
    seed: int,
    demos_uri: str,
    pipeline: str,
    kfp_run_id: str,
    demos: Output[Dataset],
    metrics: Output[Metrics],
):
    from distillery.platform.stepping import run_step
    from distillery.steps import mode

    run_step(mode.collect_demos, pipeline=pipeline, step="demos", kfp_run_id=kfp_run_id, kfp_metrics=metrics,
             out_dir=demos.path, episodes_per_task=episodes_per_task, seed=seed, demos_uri=demos_uri)


@component
def validate_demos(
    demos: Input[Dataset],
    min_episodes_per_task: int,
    pipeline: str,
    kfp_run_id: str,
    report: Output[HTML],
    metrics: Output[Metrics],
):
    from distillery.platform.stepping import run_step
    from distillery.steps import mode

    run_step(mode.validate_demos, pipeline=pipeline, step="validate", kfp_run_id=kfp_run_id, kfp_metrics=metrics,
             dataset_dir=demos.path, report_path=report.path, min_episodes_per_task=min_episodes_per_task)


@component
def train_policy(
    demos: Input[Dataset],
    dense: bool,
    width: int,
    depth: int,
    num_experts: int,
    top_k: int,
    expert_hidden: int,
    chunk: int,
    obs_history: int,
    steps: int,
    batch_size: int,
    lr: float,
    sampling_steps: int,
    seed: int,
    pipeline: str,
    kfp_run_id: str,
    policy: Output[Model],
    metrics: Output[Metrics],
):
    from distillery.platform.stepping import run_step
    from distillery.steps import mode

    run_step(mode.train, pipeline=pipeline, step="train-dense" if dense else "train-mode", kfp_run_id=kfp_run_id,
             kfp_metrics=metrics, dataset_dir=demos.path, out_dir=policy.path, dense=dense, width=width, depth=depth,
             num_experts=num_experts, top_k=top_k, expert_hidden=expert_hidden, chunk=chunk, obs_history=obs_history,
             steps=steps, batch_size=batch_size, lr=lr, sampling_steps=sampling_steps, seed=seed)


@component
def evaluate_policies(
    mode_policy: Input[Model],
    dense_policy: Input[Model],
    episodes_per_task: int,
    max_steps: int,
    execute: int,
    seed: int,
    pipeline: str,
    kfp_run_id: str,
    table: Output[Markdown],
    metrics: Output[Metrics],
):
    from distillery.platform.stepping import run_step
    from distillery.steps import mode

    run_step(mode.evaluate, pipeline=pipeline, step="evaluate", kfp_run_id=kfp_run_id, kfp_metrics=metrics,
             mode_dir=mode_policy.path, dense_dir=dense_policy.path, episodes_per_task=episodes_per_task,
             max_steps=max_steps, execute=execute, seed=seed, table_path=table.path)
