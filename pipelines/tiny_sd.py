"""tiny-sd: a text-to-image latent diffusion model trained from raw image+caption data.

A tiny AutoencoderKL compresses images to latents; a tiny text-conditional UNet learns to denoise
them, conditioned on a frozen MiniLM sentence encoder, with caption dropout so classifier-free
guidance works at sampling time. A feature network trained on the same real data measures the
result: Frechet distance to held-out images in its feature space and conditional accuracy (does
the image show the class the prompt asked for). Only a model that passes the thresholds and is
not worse than the current champion is registered, promoted and deployed. This model is the
teacher of the SCott, Hybrid SD and SwiftDiffusion pipelines.
"""

from kfp import dsl

from components.common import deploy, finish_run, gate, register, validate_image_captions
from components.tiny_sd import (
    evaluate_text_to_image,
    prepare_image_captions,
    train_feature_net,
    train_unet,
    train_vae,
)
from distillery.platform.pods import configure_pipeline_tasks
from pipelines.params import tracking_args


@dsl.pipeline(name="tiny-sd", description=__doc__.split("\n")[0])
def tiny_sd(
    sources: str = "mnist",
    resolution: int = 32,
    per_class: int = 100,
    holdout_fraction: float = 0.1,
    dataset_uri: str = "",
    balance_tolerance: float = 0.5,
    feature_steps: int = 300,
    vae_steps: int = 300,
    vae_batch_size: int = 32,
    vae_lr: float = 1e-3,
    unet_steps: int = 600,
    unet_batch_size: int = 32,
    unet_lr: float = 5e-4,
    cond_dropout: float = 0.1,
    eval_per_class: int = 8,
    eval_steps: int = 20,
    guidance_scale: float = 3.0,
    gate_thresholds: dict = {"fd": ["max", 50.0], "cond_acc": ["min", 0.5]},
    model_name: str = "tiny-sd",
    gpu: bool = False,
    seed: int = 0,
):
    """Train, evaluate, gate, register and deploy a tiny Stable Diffusion model.

    Args:
        sources: Comma-separated raw sources for the image+caption dataset (mnist, emoji).
        resolution: Image side in pixels; the VAE downsamples it 4x into latents.
        per_class: Images sampled per class (class-balanced).
        holdout_fraction: Share of each class held out for evaluation.
        dataset_uri: Use this dataset artifact (path or s3://) instead of building one from the raw sources.
        balance_tolerance: Largest allowed relative deviation of a class count from the mean.
        feature_steps: Training steps of the evaluation feature network.
        vae_steps: Training steps of the autoencoder.
        vae_batch_size: Autoencoder batch size.
        vae_lr: Autoencoder learning rate.
        unet_steps: Training steps of the denoising UNet.
        unet_batch_size: UNet batch size.
        unet_lr: UNet learning rate.
        cond_dropout: Probability of dropping the caption in training (enables classifier-free guidance).
        eval_per_class: Generated images per class prompt in evaluation.
        eval_steps: Sampling steps used in evaluation.
        guidance_scale: Classifier-free guidance scale used in evaluation.
        gate_thresholds: Gate: metric -> ["max" or "min", bound]; the model must also not be worse than the champion's fd.
        model_name: Registered model name.
        gpu: Deploy the predictor with one GPU.
        seed: Random seed of every step.
    """
    t = tracking_args("tiny-sd")
    # The exit handler ends the MLflow parent run with the pipeline's state, whatever happened inside.
    with dsl.ExitHandler(finish_run(**t).set_caching_options(False), name="tracked"):
        data = prepare_image_captions(sources=sources, resolution=resolution, per_class=per_class,
                                      holdout_fraction=holdout_fraction, seed=seed, dataset_uri=dataset_uri, **t)
        checked = validate_image_captions(dataset=data.outputs["dataset"], balance_tolerance=balance_tolerance, **t)
        dataset = data.outputs["dataset"]

        feature_net = train_feature_net(dataset=dataset, steps=feature_steps, seed=seed, **t).after(checked)
        vae = train_vae(dataset=dataset, steps=vae_steps, batch_size=vae_batch_size, lr=vae_lr, seed=seed,
                        **t).after(checked)
        unet = train_unet(dataset=dataset, vae=vae.outputs["vae"], steps=unet_steps, batch_size=unet_batch_size,
                          lr=unet_lr, cond_dropout=cond_dropout, seed=seed, **t)
        evaluation = evaluate_text_to_image(model=unet.outputs["model"], dataset=dataset,
                                            feature_net=feature_net.outputs["feature_net"],
                                            num_per_class=eval_per_class, steps=eval_steps,
                                            guidance_scale=guidance_scale, seed=seed, **t)

        decision = gate(metrics=evaluation.outputs["metrics"], model_name=model_name, thresholds=gate_thresholds,
                        directions={"fd": "min", "cond_acc": "max"},
                        **t).set_caching_options(False)  # the champion may change between runs
        with dsl.If(decision.outputs["Output"] == True):  # noqa: E712 (KFP condition, not a Python bool)
            version = register(model=unet.outputs["model"], metrics=evaluation.outputs["metrics"],
                               model_name=model_name, **t).set_caching_options(False)
            deploy(model_name=model_name, version=version.output, kind="text-to-image", gpu=gpu,
                   **t).set_caching_options(False)
    configure_pipeline_tasks()  # ConfigMap/Secret env, image, resources, retries (platform/pods.py)
