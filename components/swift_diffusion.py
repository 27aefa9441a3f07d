"""Components of SwiftDiffusion: one add-on's training and evaluation, the add-on store's registration, and the
serving evaluation that assembles the runtime release."""

from typing import List

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import component


@component
def train_addon(
    base: Input[Model],
    dataset: Input[Dataset],
    addon: str,
    lora_steps: int,
    lora_rank: int,
    lora_lr: float,
    controlnet_steps: int,
    controlnet_lr: float,
    batch_size: int,
    cond_dropout: float,
    seed: int,
    pipeline: str,
    kfp_run_id: str,
    weights: Output[Model],
    metrics: Output[Metrics],
):
    from distillery.platform.stepping import run_step
    from distillery.steps import swift_diffusion

    run_step(swift_diffusion.train_addon, pipeline=pipeline, step=f"train-{addon.replace('/', '-')}",
             kfp_run_id=kfp_run_id, kfp_metrics=metrics, base_dir=base.path, dataset_dir=dataset.path,
             out_dir=weights.path, addon=addon, lora_steps=lora_steps, lora_rank=lora_rank, lora_lr=lora_lr,
             controlnet_steps=controlnet_steps, controlnet_lr=controlnet_lr, batch_size=batch_size,
             cond_dropout=cond_dropout, seed=seed)


@component
def evaluate_addon(
    base: Input[Model],
    weights: Input[Model],
    addon: str,
    dataset: Input[Dataset],
    feature_net: Input[Model],
    num_per_class: int,
    steps: int,
    guidance_scale: float,
    seed: int,
    pipeline: str,
    kfp_run_id: str,
    metrics: Output[Metrics],
) -> str:
    import json

    from distillery.platform.stepping import run_step
    from distillery.steps import swift_diffusion

    result = run_step(swift_diffusion.evaluate_addon, pipeline=pipeline, step=f"evaluate-{addon.replace('/', '-')}",
                      kfp_run_id=kfp_run_id, kfp_metrics=metrics, base_dir=base.path, addon_dir=weights.path,
                      dataset_dir=dataset.path, feature_net_dir=feature_net.path, num_per_class=num_per_class,
                      steps=steps, guidance_scale=guidance_scale, seed=seed)
    return json.dumps(result)


@component
def register_addons(
    addons: Input[List[Model]],
    evaluations: list,
    model_name: str,
    pipeline: str,
    kfp_run_id: str,
    store: Output[Model],
    metrics: Output[Metrics],
) -> str:
    import json

    from distillery.platform.stepping import run_step
    from distillery.steps import swift_diffusion

    result = run_step(swift_diffusion.register_addons, pipeline=pipeline, step="register-addons",
                      kfp_run_id=kfp_run_id, kfp_metrics=metrics, addons=[a.path for a in addons],
                      evaluations=evaluations, model_name=model_name, store_dir=store.path)
    return json.dumps({k: v for k, v in result.items() if isinstance(v, float)})


@component
def evaluate_serving(
    base: Input[Model],
    store: Input[Model],
    addon_metrics: str,
    dataset: Input[Dataset],
    feature_net: Input[Model],
    steps: int,
    guidance_scale: float,
    wait_fraction: float,
    trials: int,
    quality_seeds: int,
    compile_backbone: bool,
    num_per_class: int,
    seed: int,
    pipeline: str,
    kfp_run_id: str,
    release: Output[Model],
    metrics: Output[Metrics],
):
    from distillery.platform.stepping import run_step
    from distillery.steps import swift_diffusion

    run_step(swift_diffusion.evaluate_serving, pipeline=pipeline, step="evaluate-serving", kfp_run_id=kfp_run_id,
             kfp_metrics=metrics, base_dir=base.path, store_dir=store.path, addon_metrics=addon_metrics,
             dataset_dir=dataset.path, feature_net_dir=feature_net.path, steps=steps, guidance_scale=guidance_scale,
             wait_fraction=wait_fraction, trials=trials, quality_seeds=quality_seeds,
             compile_backbone=compile_backbone, num_per_class=num_per_class, seed=seed, release_dir=release.path)
