"""Components of Hybrid SD: layer significance, pruning, KD fine-tuning, tiny VAE, split evaluation."""

from kfp.dsl import Input, Markdown, Metrics, Model, Output, Dataset

from components import component


@component
def score_layers(
    teacher: Input[Model],
    dataset: Input[Dataset],
    shard: int,
    shards: list,
    num_prompts: int,
    steps: int,
    guidance_scale: float,
    seed: int,
    pipeline: str,
    kfp_run_id: str,
    metrics: Output[Metrics],
) -> str:
    import json

    from distillery.platform.stepping import run_step
    from distillery.steps import hybrid_sd

    result = run_step(hybrid_sd.score_layers, pipeline=pipeline, step=f"score-layers-{shard}", kfp_run_id=kfp_run_id,
                      kfp_metrics=metrics, teacher_dir=teacher.path, dataset_dir=dataset.path, shard=[int(x) for x in shards].index(int(shard)),
                      num_shards=len(shards), num_prompts=num_prompts, steps=steps,
                      guidance_scale=guidance_scale, seed=seed)
    return json.dumps(result["scores"])


@component
def prune_unet(
    teacher: Input[Model],
    scores: list,
    pipeline: str,
    kfp_run_id: str,
    pruned: Output[Model],
    uniform: Output[Model],
    metrics: Output[Metrics],
):
    from distillery.platform.stepping import run_step
    from distillery.steps import hybrid_sd

    run_step(hybrid_sd.prune, pipeline=pipeline, step="prune", kfp_run_id=kfp_run_id, kfp_metrics=metrics,
             teacher_dir=teacher.path, scores=scores, tiered_dir=pruned.path, uniform_dir=uniform.path)


@component
def distill_small(
    teacher: Input[Model],
    student: Input[Model],
    dataset: Input[Dataset],
    name: str,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    pipeline: str,
    kfp_run_id: str,
    unet: Output[Model],
    metrics: Output[Metrics],
):
    from distillery.platform.stepping import run_step
    from distillery.steps import hybrid_sd

    run_step(hybrid_sd.distill_small, pipeline=pipeline, step=f"kd-{name}", kfp_run_id=kfp_run_id,
             kfp_metrics=metrics, teacher_dir=teacher.path, student_dir=student.path, dataset_dir=dataset.path,
             out_dir=unet.path, steps=steps, batch_size=batch_size, lr=lr, seed=seed)


@component
def train_tiny_vae(
    teacher: Input[Model],
    dataset: Input[Dataset],
    steps: int,
    batch_size: int,
    lr: float,
    adv_weight: float,
    seed: int,
    pipeline: str,
    kfp_run_id: str,
    vae: Output[Model],
    metrics: Output[Metrics],
):
    from distillery.platform.stepping import run_step
    from distillery.steps import hybrid_sd

    run_step(hybrid_sd.train_tiny_vae, pipeline=pipeline, step="tiny-vae", kfp_run_id=kfp_run_id,
             kfp_metrics=metrics, teacher_dir=teacher.path, dataset_dir=dataset.path, out_dir=vae.path, steps=steps,
             batch_size=batch_size, lr=lr, adv_weight=adv_weight, seed=seed)


@component
def evaluate_hybrid(
    teacher: Input[Model],
    small: Input[Model],
    uniform: Input[Model],
    tiny_vae: Input[Model],
    dataset: Input[Dataset],
    feature_net: Input[Model],
    steps: int,
    splits: list,
    orders: list,
    headline_split: int,
    guidance_scale: float,
    num_per_class: int,
    seed: int,
    pipeline: str,
    kfp_run_id: str,
    table: Output[Markdown],
    release: Output[Model],
    metrics: Output[Metrics],
):
    from distillery.platform.stepping import run_step
    from distillery.steps import hybrid_sd

    run_step(hybrid_sd.evaluate, pipeline=pipeline, step="evaluate", kfp_run_id=kfp_run_id, kfp_metrics=metrics,
             teacher_dir=teacher.path, small_dir=small.path, uniform_dir=uniform.path, tiny_vae_dir=tiny_vae.path,
             dataset_dir=dataset.path, feature_net_dir=feature_net.path, steps=steps, splits=splits, orders=orders,
             headline_split=headline_split, guidance_scale=guidance_scale, num_per_class=num_per_class, seed=seed,
             table_path=table.path, release_dir=release.path)
