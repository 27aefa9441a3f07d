"""hybrid-sd: a large model plans the first denoising steps in the cloud, a pruned small model finishes them on the edge.

The teacher is a tiny-sd model trained here from the image+caption data (colour emoji by default, the smoke
profile's; the cpu and paper profiles take digits, since the smallest emoji class holds 85 images), or any diffusers
Stable Diffusion pipeline imported by URI. Its
UNet loses, BK-SDM style, the mid block and the final up stage's last ResNet + attention pair; each remaining
candidate layer (ResNet and attention blocks) is scored by how much pruning it alone to half changes the
statistics of generated latents, scored in parallel shards. The least significant third keeps 25% of its channels
(or heads and feed-forward units), the next 50%, the rest 75% (structural pruning, GroupNorm-aware); a UNet with
the same blocks removed and one keep ratio everywhere, at the same parameter count, is the baseline. Both are
fine-tuned with BK-SDM knowledge distillation (denoising, output and
block-feature losses) on the same budget, while a lightweight VAE (AutoencoderTiny) learns the teacher's latent space
with latent degradation and a hinge adversarial loss. Evaluation sweeps the split point k of N steps in both orders
(large->small as Hybrid SD, small->large as T-Stitch) for FD, conditional accuracy and the large model's FLOPs. The
edge model (pruned UNet + tiny VAE) and the hybrid configuration are gated, registered and deployed as a cloud and an
edge predictor.
"""

from kfp import dsl
from kfp.dsl import Model

from components.common import deploy, finish_run, gate, register, validate_image_captions
from components.hybrid_sd import distill_small, evaluate_hybrid, prune_unet, score_layers, train_tiny_vae
from components.tiny_sd import prepare_image_captions, train_feature_net, train_unet, train_vae
from distillery.platform.pods import configure_pipeline_tasks
from pipelines.params import tracking_args


@dsl.pipeline(name="hybrid-sd", description=__doc__.split("\n")[0])
def hybrid_sd(
    sources: str = "emoji",
    resolution: int = 32,
    per_class: int = 100,
    holdout_fraction: float = 0.1,
    dataset_uri: str = "",
    balance_tolerance: float = 0.5,
    teacher_uri: str = "",
    feature_steps: int = 300,
    vae_steps: int = 300,
    vae_batch_size: int = 32,
    vae_lr: float = 1e-3,
    unet_steps: int = 600,
    unet_batch_size: int = 32,
    unet_lr: float = 5e-4,
    cond_dropout: float = 0.1,
    score_shards: list = [0, 1],
    score_prompts: int = 8,
    score_steps: int = 10,
    kd_steps: int = 500,
    kd_batch_size: int = 32,
    kd_lr: float = 2e-4,
    tiny_vae_steps: int = 500,
    tiny_vae_batch_size: int = 32,
    tiny_vae_lr: float = 1e-3,
    tiny_vae_adv_weight: float = 0.05,
    eval_steps: int = 25,
    splits: list = [0, 5, 10, 20, 25],
    orders: list = ["large-small", "small-large"],
    headline_split: int = 10,
    guidance_scale: float = 3.0,
    eval_per_class: int = 8,
    gate_thresholds: dict = {"fd_ratio_large_small_vs_large": ["max", 1.15], "cloud_flops_ratio_large_small": ["max", 0.4]},
    model_name: str = "hybrid-sd",
    gpu: bool = False,
    seed: int = 0,
):
    """Prune and distill an edge model from a tiny Stable Diffusion teacher and release it as a cloud+edge hybrid.

    Args:
        sources: Comma-separated raw sources for the image+caption dataset (mnist, emoji).
        resolution: Image side in pixels (must match an imported teacher's).
        per_class: Images sampled per class (class-balanced).
        holdout_fraction: Share of each class held out for evaluation.
        dataset_uri: Use this dataset artifact (path or s3://) instead of building one from the raw sources.
        balance_tolerance: Largest allowed relative deviation of a class count from the mean.
        teacher_uri: A diffusers StableDiffusionPipeline folder (path or s3://) to use as the large model instead of training one.
        feature_steps: Training steps of the evaluation feature network.
        vae_steps: Teacher autoencoder training steps (when no teacher_uri).
        vae_batch_size: Teacher autoencoder batch size.
        vae_lr: Teacher autoencoder learning rate.
        unet_steps: Teacher UNet training steps (when no teacher_uri).
        unet_batch_size: Teacher UNet batch size.
        unet_lr: Teacher UNet learning rate.
        cond_dropout: Caption dropout of the teacher (enables classifier-free guidance).
        score_shards: One parallel significance-scoring task per item; each scores every len(score_shards)-th candidate layer.
        score_prompts: Fixed prompts (with fixed seeds) whose latents score each candidate layer.
        score_steps: Sampling steps of the scoring generations.
        kd_steps: Knowledge-distillation steps of each pruned UNet (scored and uniform get the same budget).
        kd_batch_size: Knowledge-distillation batch size.
        kd_lr: Knowledge-distillation learning rate.
        tiny_vae_steps: Training steps of the lightweight VAE.
        tiny_vae_batch_size: Lightweight VAE batch size.
        tiny_vae_lr: Lightweight VAE learning rate.
        tiny_vae_adv_weight: Weight of the hinge adversarial loss of the lightweight VAE's decoder (on for the second half).
        eval_steps: Sampling steps N of every hybrid trajectory.
        splits: Split points k evaluated: the first model runs k of the N steps (0 and N are the single models).
        orders: Orders evaluated: large-small (Hybrid SD) and/or small-large (T-Stitch).
        headline_split: The split released and gated (Hybrid SD's order); must be one of splits.
        guidance_scale: Classifier-free guidance scale of both models.
        eval_per_class: Generated images per class prompt in each evaluated row.
        gate_thresholds: Gate: metric -> ["max" or "min", bound]; the model must also not be worse than the champion's fd.
        model_name: Registered model name of the release (edge model, cloud model and hybrid configuration).
        gpu: Deploy the predictors with one GPU.
        seed: Random seed of every step.
    """
    t = tracking_args("hybrid-sd")
    with dsl.ExitHandler(finish_run(**t).set_caching_options(False), name="tracked"):
        data = prepare_image_captions(sources=sources, resolution=resolution, per_class=per_class,
                                      holdout_fraction=holdout_fraction, seed=seed, dataset_uri=dataset_uri, **t)
        checked = validate_image_captions(dataset=data.outputs["dataset"], balance_tolerance=balance_tolerance, **t)
        dataset = data.outputs["dataset"]
        feature_net = train_feature_net(dataset=dataset, steps=feature_steps, seed=seed, **t).after(checked)

        def prune_distill_release(teacher):
            """Score -> prune -> KD || tiny VAE -> evaluate splits -> gate -> register -> deploy, from one teacher."""
            with dsl.ParallelFor(items=score_shards, parallelism=4) as shard:
                scored = score_layers(teacher=teacher, dataset=dataset, shard=shard, shards=score_shards,
                                      num_prompts=score_prompts, steps=score_steps, guidance_scale=guidance_scale,
                                      seed=seed, **t)
            pruned = prune_unet(teacher=teacher, scores=dsl.Collected(scored.outputs["Output"]), **t)
            students = {}
            for name, key in (("scored", "pruned"), ("uniform", "uniform")):
                students[name] = distill_small(teacher=teacher, student=pruned.outputs[key], dataset=dataset,
                                               name=name, steps=kd_steps, batch_size=kd_batch_size, lr=kd_lr,
                                               seed=seed, **t).set_display_name(f"kd-{name}")
            tiny_vae = train_tiny_vae(teacher=teacher, dataset=dataset, steps=tiny_vae_steps,
                                      batch_size=tiny_vae_batch_size, lr=tiny_vae_lr, adv_weight=tiny_vae_adv_weight,
                                      seed=seed, **t)
            evaluation = evaluate_hybrid(teacher=teacher, small=students["scored"].outputs["unet"],
                                         uniform=students["uniform"].outputs["unet"],
                                         tiny_vae=tiny_vae.outputs["vae"], dataset=dataset,
                                         feature_net=feature_net.outputs["feature_net"], steps=eval_steps,
                                         splits=splits, orders=orders, headline_split=headline_split,
                                         guidance_scale=guidance_scale, num_per_class=eval_per_class, seed=seed, **t)
            decision = gate(metrics=evaluation.outputs["metrics"], model_name=model_name, thresholds=gate_thresholds,
                            directions={"fd": "min", "cond_acc": "max"}, **t).set_caching_options(False)
            with dsl.If(decision.outputs["Output"] == True):  # noqa: E712 (KFP condition, not a Python bool)
                version = register(model=evaluation.outputs["release"], metrics=evaluation.outputs["metrics"],
                                   model_name=model_name, **t).set_caching_options(False)
                for kind in ("hybrid-cloud", "hybrid-edge"):
                    deploy(model_name=model_name, version=version.output, kind=kind, gpu=gpu,
                           **t).set_caching_options(False).set_display_name(f"deploy-{kind}")

        # The same downstream DAG in both branches: the local runner cannot merge branch outputs (dsl.OneOf).
        with dsl.If(teacher_uri == "", name="train-teacher"):
            vae = train_vae(dataset=dataset, steps=vae_steps, batch_size=vae_batch_size, lr=vae_lr, seed=seed,
                            **t).after(checked)
            unet = train_unet(dataset=dataset, vae=vae.outputs["vae"], steps=unet_steps, batch_size=unet_batch_size,
                              lr=unet_lr, cond_dropout=cond_dropout, seed=seed, **t)
            prune_distill_release(unet.outputs["model"])
        with dsl.Else(name="import-teacher"):
            imported = dsl.importer(artifact_uri=teacher_uri, artifact_class=Model, reimport=False).after(checked)
            prune_distill_release(imported.output)
    configure_pipeline_tasks()  # ConfigMap/Secret env, image, resources, retries (platform/pods.py)
