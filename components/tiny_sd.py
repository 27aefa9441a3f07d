"""Components of the tiny Stable Diffusion family (the teacher of SCott, Hybrid SD and SwiftDiffusion)."""

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import component


@component
def prepare_image_captions(
    sources: str,
    resolution: int,
    per_class: int,
    holdout_fraction: float,
    seed: int,
    dataset_uri: str,
    pipeline: str,
    kfp_run_id: str,
    dataset: Output[Dataset],
    metrics: Output[Metrics],
):
    from distillery.platform.stepping import run_step
    from distillery.steps import data

    run_step(data.prepare_image_captions, pipeline=pipeline, step="data",
             kfp_run_id=kfp_run_id, kfp_metrics=metrics, out_dir=dataset.path, sources=sources,
             resolution=resolution, per_class=per_class, holdout_fraction=holdout_fraction, seed=seed,
             dataset_uri=dataset_uri)


@component
def train_feature_net(
    dataset: Input[Dataset],
    steps: int,
    seed: int,
    pipeline: str,
    kfp_run_id: str,
    feature_net: Output[Model],
    metrics: Output[Metrics],
):
    from distillery.platform.stepping import run_step
    from distillery.steps import tiny_sd

    run_step(tiny_sd.train_feature_net, pipeline=pipeline, step="feature-net",
             kfp_run_id=kfp_run_id, kfp_metrics=metrics, dataset_dir=dataset.path, out_dir=feature_net.path,
             steps=steps, seed=seed)


@component
def train_vae(
    dataset: Input[Dataset],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    pipeline: str,
    kfp_run_id: str,
    vae: Output[Model],
    metrics: Output[Metrics],
):
    from distillery.platform.stepping import run_step
    from distillery.steps import tiny_sd

    run_step(tiny_sd.train_vae, pipeline=pipeline, step="train-vae",
             kfp_run_id=kfp_run_id, kfp_metrics=metrics, dataset_dir=dataset.path, out_dir=vae.path,
             steps=steps, batch_size=batch_size, lr=lr, seed=seed)


@component
def train_unet(
    dataset: Input[Dataset],
    vae: Input[Model],
    steps: int,
    batch_size: int,
    lr: float,
    cond_dropout: float,
    seed: int,
    pipeline: str,
    kfp_run_id: str,
    model: Output[Model],
    metrics: Output[Metrics],
):
    from distillery.platform.stepping import run_step
    from distillery.steps import tiny_sd

    run_step(tiny_sd.train_unet, pipeline=pipeline, step="train-unet",
             kfp_run_id=kfp_run_id, kfp_metrics=metrics, dataset_dir=dataset.path, vae_dir=vae.path,
             out_dir=model.path, steps=steps, batch_size=batch_size, lr=lr, cond_dropout=cond_dropout, seed=seed)


@component
def evaluate_text_to_image(
    model: Input[Model],
    dataset: Input[Dataset],
    feature_net: Input[Model],
    num_per_class: int,
    steps: int,
    guidance_scale: float,
    seed: int,
    pipeline: str,
    kfp_run_id: str,
    metrics: Output[Metrics],
):
    from distillery.platform.stepping import run_step
    from distillery.steps import tiny_sd

    run_step(tiny_sd.evaluate, pipeline=pipeline, step="evaluate",
             kfp_run_id=kfp_run_id, kfp_metrics=metrics, model_dir=model.path, dataset_dir=dataset.path,
             feature_net_dir=feature_net.path, num_per_class=num_per_class, steps=steps,
             guidance_scale=guidance_scale, seed=seed)
