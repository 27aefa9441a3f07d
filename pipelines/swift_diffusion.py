"""swift-diffusion: Stable Diffusion served with LoRA and ControlNet add-ons kept off the request's critical path.

The base model is a tiny-sd model trained here from the image+caption data, or any diffusers Stable Diffusion
pipeline imported by URI. On the frozen base, the add-ons train in parallel: a ControlNet (`ControlNetModel.from_unet`)
that makes the output follow the Sobel edge map of an image, and UNet-only LoRAs (peft), one per style (inverted,
thick strokes, orange tint). Each add-on is evaluated against the base with the same prompts and seeds by the
versioned evaluator: a LoRA must move the output toward its style (FD to the held-out images in that style, below the
base's), the ControlNet must make the output follow the edges (edge F1 above the base's). The add-ons are registered
together as a versioned add-on store on the object store. Serving is then evaluated on that store: the SwiftDiffusion
runtime (a LoRA fetched in the background and patched in at a step boundary, waited for only at step K; the
ControlNet concurrent with the UNet) against plain diffusers (load + fuse per request, ControlNet first): latency of
one ControlNet + one cold LoRA, the add-ons' overhead, and SSIM of a LoRA landing at K/N = 0.2 against it from step 0.
The gate bounds all of it; the base with its runtime configuration (the add-on store it serves) is registered and
deployed as a `swift-diffusion` InferenceService.
"""

from kfp import dsl
from kfp.dsl import Model

from components.common import deploy, finish_run, gate, register, validate_image_captions
from components.swift_diffusion import evaluate_addon, evaluate_serving, register_addons, train_addon
from components.tiny_sd import prepare_image_captions, train_feature_net, train_unet, train_vae
from distillery.platform.pods import configure_pipeline_tasks
from distillery.steps.swift_diffusion import ADDON_PARALLELISM
from pipelines.params import tracking_args


@dsl.pipeline(name="swift-diffusion", description=__doc__.split("\n")[0])
def swift_diffusion(
    sources: str = "mnist",
    resolution: int = 32,
    per_class: int = 100,
    holdout_fraction: float = 0.1,
    dataset_uri: str = "",
    balance_tolerance: float = 0.5,
    base_uri: str = "",
    feature_steps: int = 300,
    vae_steps: int = 300,
    vae_batch_size: int = 32,
    vae_lr: float = 1e-3,
    unet_steps: int = 600,
    unet_batch_size: int = 32,
    unet_lr: float = 5e-4,
    cond_dropout: float = 0.1,
    addons: list = ["controlnet/edges", "lora/inverted", "lora/thick", "lora/tint"],
    lora_steps: int = 300,
    lora_rank: int = 4,
    lora_lr: float = 1e-3,
    controlnet_steps: int = 300,
    controlnet_lr: float = 5e-4,
    addon_batch_size: int = 16,
    eval_steps: int = 20,
    guidance_scale: float = 3.0,
    eval_per_class: int = 8,
    serving_steps: int = 20,
    wait_fraction: float = 0.4,
    serving_trials: int = 5,
    quality_seeds: int = 8,
    compile_backbone: bool = False,
    gate_thresholds: dict = {"lora_style_fd_ratio_max": ["max", 0.9], "controlnet_edges_edge_f1_gain": ["min", 0.05],
                             "latency_ratio_cn_cold_lora": ["max", 0.9], "ssim_late_patch": ["min", 0.85]},
    model_name: str = "swift-diffusion",
    gpu: bool = False,
    seed: int = 0,
):
    """Train LoRA and ControlNet add-ons on a tiny Stable Diffusion base and deploy the SwiftDiffusion serving runtime.

    Args:
        sources: Comma-separated raw sources for the image+caption dataset (mnist, emoji).
        resolution: Image side in pixels (must match an imported base's).
        per_class: Images sampled per class (class-balanced).
        holdout_fraction: Share of each class held out for evaluation.
        dataset_uri: Use this dataset artifact (path or s3://) instead of building one from the raw sources.
        balance_tolerance: Largest allowed relative deviation of a class count from the mean.
        base_uri: A diffusers StableDiffusionPipeline folder (path or s3://) to use as the base instead of training one.
        feature_steps: Training steps of the evaluation feature network.
        vae_steps: Base autoencoder training steps (when no base_uri).
        vae_batch_size: Base autoencoder batch size.
        vae_lr: Base autoencoder learning rate.
        unet_steps: Base UNet training steps (when no base_uri).
        unet_batch_size: Base UNet batch size.
        unet_lr: Base UNet learning rate.
        cond_dropout: Caption dropout of the base and of every add-on (keeps classifier-free guidance working).
        addons: The add-ons, one parallel training task each, named by their path in the store: controlnet/edges and lora/<style> (inverted, thick, tint).
        lora_steps: Optimizer steps of each LoRA.
        lora_rank: Rank r of each LoRA (alpha = r, so the update is B A).
        lora_lr: LoRA learning rate.
        controlnet_steps: Optimizer steps of the ControlNet.
        controlnet_lr: ControlNet learning rate.
        addon_batch_size: Batch size of every add-on's training.
        eval_steps: Sampling steps of the add-on evaluations.
        guidance_scale: Classifier-free guidance scale of every generation.
        eval_per_class: Generated images per class prompt, with and without each add-on.
        serving_steps: Denoising steps N of the serving evaluation's requests.
        wait_fraction: K/N of the released runtime: a request waits for its LoRA only at step K.
        serving_trials: Timed requests per configuration in the serving evaluation (after one warm-up).
        compile_backbone: Serve with the UNet and ControlNets compiled by torch.compile (the ControlNet then runs right before the UNet): faster requests, a load that compiles for 15-60 s.
        quality_seeds: Images compared by SSIM for the late-patching quality (each LoRA at K/N 0.1, 0.2, 0.4 vs from step 0).
        gate_thresholds: Gate: metric -> ["max" or "min", bound]; the release must also keep the champion's late-patching SSIM.
        model_name: Registered model name of the runtime release (base + configuration); the add-on store is <model_name>-addons.
        gpu: Deploy the predictor with one GPU.
        seed: Random seed of every step.
    """
    t = tracking_args("swift-diffusion")
    with dsl.ExitHandler(finish_run(**t).set_caching_options(False), name="tracked"):
        data = prepare_image_captions(sources=sources, resolution=resolution, per_class=per_class,
                                      holdout_fraction=holdout_fraction, seed=seed, dataset_uri=dataset_uri, **t)
        checked = validate_image_captions(dataset=data.outputs["dataset"], balance_tolerance=balance_tolerance, **t)
        dataset = data.outputs["dataset"]
        feature_net = train_feature_net(dataset=dataset, steps=feature_steps, seed=seed, **t).after(checked)

        def addons_evaluate_release(base):
            """Add-ons in parallel (train, evaluate) -> add-on store -> serving evaluation -> gate -> register ->
            deploy, on one base."""
            with dsl.ParallelFor(items=addons, parallelism=ADDON_PARALLELISM) as addon:
                trained = train_addon(base=base, dataset=dataset, addon=addon, lora_steps=lora_steps,
                                      lora_rank=lora_rank, lora_lr=lora_lr, controlnet_steps=controlnet_steps,
                                      controlnet_lr=controlnet_lr, batch_size=addon_batch_size,
                                      cond_dropout=cond_dropout, seed=seed, **t)
                evaluated = evaluate_addon(base=base, weights=trained.outputs["weights"], addon=addon,
                                           dataset=dataset, feature_net=feature_net.outputs["feature_net"],
                                           num_per_class=eval_per_class, steps=eval_steps,
                                           guidance_scale=guidance_scale, seed=seed, **t)
            store = register_addons(addons=dsl.Collected(trained.outputs["weights"]),
                                    evaluations=dsl.Collected(evaluated.outputs["Output"]), model_name=model_name,
                                    **t).set_caching_options(False)
            serving = evaluate_serving(base=base, store=store.outputs["store"], addon_metrics=store.outputs["Output"],
                                       dataset=dataset, feature_net=feature_net.outputs["feature_net"],
                                       steps=serving_steps, guidance_scale=guidance_scale,
                                       wait_fraction=wait_fraction, trials=serving_trials,
                                       quality_seeds=quality_seeds, compile_backbone=compile_backbone,
                                       num_per_class=eval_per_class, seed=seed, **t)
            decision = gate(metrics=serving.outputs["metrics"], model_name=model_name, thresholds=gate_thresholds,
                            directions={"ssim_late_patch": "max"}, **t).set_caching_options(False)
            with dsl.If(decision.outputs["Output"] == True):  # noqa: E712 (KFP condition, not a Python bool)
                version = register(model=serving.outputs["release"], metrics=serving.outputs["metrics"],
                                   model_name=model_name, **t).set_caching_options(False)
                deploy(model_name=model_name, version=version.output, kind="swift-diffusion", gpu=gpu,
                       **t).set_caching_options(False)

        # The same downstream DAG in both branches: the local runner cannot merge branch outputs (dsl.OneOf).
        with dsl.If(base_uri == "", name="train-base"):
            vae = train_vae(dataset=dataset, steps=vae_steps, batch_size=vae_batch_size, lr=vae_lr, seed=seed,
                            **t).after(checked)
            unet = train_unet(dataset=dataset, vae=vae.outputs["vae"], steps=unet_steps, batch_size=unet_batch_size,
                              lr=unet_lr, cond_dropout=cond_dropout, seed=seed, **t)
            addons_evaluate_release(unet.outputs["model"])
        with dsl.Else(name="import-base"):
            imported = dsl.importer(artifact_uri=base_uri, artifact_class=Model, reimport=False).after(checked)
            addons_evaluate_release(imported.output)
    configure_pipeline_tasks()  # ConfigMap/Secret env, image, resources, retries (platform/pods.py)
