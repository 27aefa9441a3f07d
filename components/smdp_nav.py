"""Components of SMDP navigation: scenarios, their validation, DPPO training, evaluation."""

from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

from components import component


@component
def generate_scenarios(
    train_per_level: int,
    eval_per_level: int,
    seed: int,
    pipeline: str,
    kfp_run_id: str,
    scenarios: Output[Dataset],
    metrics: Output[Metrics],
):
    from distillery.platform.stepping import run_step
    from distillery.steps import smdp_nav

    run_step(smdp_nav.generate_scenarios, pipeline=pipeline, step="scenarios", kfp_run_id=kfp_run_id,
             kfp_metrics=metrics, out_dir=scenarios.path, train_per_level=train_per_level,
             eval_per_level=eval_per_level, seed=seed)


@component
def validate_scenarios(
    scenarios: Input[Dataset],
    min_density: float,
    max_density: float,
    pipeline: str,
    kfp_run_id: str,
    report: Output[HTML],
    metrics: Output[Metrics],
):
    from distillery.platform.stepping import run_step
    from distillery.steps import smdp_nav

    run_step(smdp_nav.validate_scenarios, pipeline=pipeline, step="validate", kfp_run_id=kfp_run_id,
             kfp_metrics=metrics, dataset_dir=scenarios.path, report_path=report.path, min_density=min_density,
             max_density=max_density)


@component
def train_navigation(
    scenarios: Input[Dataset],
    variant: str,
    fixed_tau: float,
    sim_budget_s: float,
    rollout_s: float,
    num_envs: int,
    lr: float,
    hidden: int,
    gamma: float,
    seed: int,
    pipeline: str,
    kfp_run_id: str,
    policy: Output[Model],
    metrics: Output[Metrics],
):
    from distillery.platform.stepping import run_step
    from distillery.steps import smdp_nav

    step = f"train-{variant}" + (f"-{fixed_tau:g}s" if variant == "fixed" else "")
    run_step(smdp_nav.train, pipeline=pipeline, step=step, kfp_run_id=kfp_run_id, kfp_metrics=metrics,
             dataset_dir=scenarios.path, out_dir=policy.path, variant=variant, fixed_tau=fixed_tau,
             sim_budget_s=sim_budget_s, rollout_s=rollout_s, num_envs=num_envs, lr=lr, hidden=hidden, gamma=gamma,
             seed=seed)


@component
def evaluate_navigation(
    scenarios: Input[Dataset],
    smdp_policy: Input[Model],
    naive_policy: Input[Model],
    fixed_short: Input[Model],
    fixed_mid: Input[Model],
    fixed_long: Input[Model],
    fixed_taus: list,
    irsim_scenarios: int,
    pipeline: str,
    kfp_run_id: str,
    table: Output[Markdown],
    metrics: Output[Metrics],
):
    from distillery.platform.stepping import run_step
    from distillery.steps import smdp_nav

    dirs = {"adaptive-smdp": smdp_policy.path, "adaptive-naive": naive_policy.path}
    dirs.update({f"fixed-{float(t):g}s": p.path for t, p in zip(fixed_taus, (fixed_short, fixed_mid, fixed_long))})
    run_step(smdp_nav.evaluate, pipeline=pipeline, step="evaluate", kfp_run_id=kfp_run_id, kfp_metrics=metrics,
             dataset_dir=scenarios.path, policy_dirs=dirs, irsim_scenarios=irsim_scenarios, table_path=table.path)
