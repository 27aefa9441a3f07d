"""scott: stochastic consistency distillation of the tiny SD teacher into a 1-2 step text-to-image model.

The teacher is a tiny-sd model trained here from the image+caption data, or any diffusers Stable Diffusion
pipeline imported by URI. Three methods are distilled from the same teacher: vanilla consistency distillation
with a deterministic DDIM teacher solver (CD-ODE, the baseline), SCott (stochastic multi-step teacher solver) and
SCott with an adversarial loss whose discriminator reads the frozen teacher's features. Each method is tuned by its
own Optuna study with the same budget (parallel workers share each study); a trial is scored at growing training
lengths and successive halving stops the weak ones, so the survivors train long enough for the adversary to
show. With its best values each method's student is distilled; one table compares them with the teacher on the
same held-out prompts and seeds, and the student with the best 2-step FD is gated, registered and deployed.
"""

from kfp import dsl
from kfp.dsl import Model

from components.common import deploy, finish_run, gate, register, validate_image_captions
from components.scott import distill, evaluate_students, select_best, sweep_worker
from components.tiny_sd import prepare_image_captions, train_feature_net, train_unet, train_vae
from distillery.platform.pods import configure_pipeline_tasks
from pipelines.params import tracking_args


@dsl.pipeline(name="scott", description=__doc__.split("\n")[0])
def scott(
    sources: str = "mnist",
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
    sweep_workers: list = [0, 1],
    trials_per_worker: int = 2,
    trial_steps: int = 100,
    trial_rungs: int = 3,
    sweep_eval_per_class: int = 20,
    search_space: dict = {"noise_strength": [0.0, 1.0], "adv_weight": [0.01, 0.5], "lr": [1e-5, 1e-3]},
    discriminator: str = "teacher",
    distill_steps: int = 500,
    distill_batch_size: int = 32,
    solver_substeps: int = 2,
    skip: int = 20,
    guidance_scale: float = 3.0,
    eval_per_class: int = 8,
    teacher_eval_steps: list = [1, 2, 4, 25, 50],
    student_eval_steps: list = [1, 2, 4],
    gate_thresholds: dict = {"fd": ["max", 50.0], "fd_ratio_vs_teacher": ["max", 1.5], "cond_acc": ["min", 0.5]},
    model_name: str = "scott",
    gpu: bool = False,
    seed: int = 0,
):
    """Distill a tiny Stable Diffusion teacher with SCott and release the 2-step student.

    Args:
        sources: Comma-separated raw sources for the image+caption dataset (mnist, emoji).
        resolution: Image side in pixels (must match an imported teacher's).
        per_class: Images sampled per class (class-balanced).
        holdout_fraction: Share of each class held out for evaluation.
        dataset_uri: Use this dataset artifact (path or s3://) instead of building one from the raw sources.
        balance_tolerance: Largest allowed relative deviation of a class count from the mean.
        teacher_uri: A diffusers StableDiffusionPipeline folder (path or s3://) to distill instead of training one.
        feature_steps: Training steps of the evaluation feature network.
        vae_steps: Teacher autoencoder training steps (when no teacher_uri).
        vae_batch_size: Teacher autoencoder batch size.
        vae_lr: Teacher autoencoder learning rate.
        unet_steps: Teacher UNet training steps (when no teacher_uri).
        unet_batch_size: Teacher UNet batch size.
        unet_lr: Teacher UNet learning rate.
        cond_dropout: Caption dropout of the teacher (enables classifier-free guidance).
        sweep_workers: One parallel sweep worker per item and method (the item seeds its sampler); the workers of a method share its Optuna study.
        trials_per_worker: Optuna trials each worker runs for each method (every method gets the same budget).
        trial_steps: Distillation steps of a trial that survives every rung.
        trial_rungs: Training lengths a trial is scored at (trial_steps / 3^k); successive halving keeps the best third at each.
        sweep_eval_per_class: Images per class prompt scoring a trial (the objective's noise must stay below the differences it ranks).
        search_space: [low, high] of noise_strength, adv_weight and lr (log scale); each method tunes only the knobs it has.
        discriminator: Discriminator of SCott+adv: teacher (heads on the frozen teacher UNet's features) or latent (standalone conv net, the ablation).
        distill_steps: Distillation steps of each final student.
        distill_batch_size: Distillation batch size.
        solver_substeps: Teacher solver steps per skipped interval (SCott's multi-step solving; CD-ODE uses 1).
        skip: Timesteps skipped per consistency step (1000 / skip grid points).
        guidance_scale: Classifier-free guidance of the teacher, distilled into the students.
        eval_per_class: Generated images per class prompt in evaluation.
        teacher_eval_steps: Sampling steps at which the teacher is evaluated.
        student_eval_steps: Sampling steps at which each student is evaluated.
        gate_thresholds: Gate on the released student (the best FD at 2 steps of the three) at 2 steps: metric -> ["max" or "min", bound]; it must also not be worse than the champion's fd.
        model_name: Registered model name of the released student.
        gpu: Deploy the predictor with one GPU.
        seed: Random seed of every step.
    """
    t = tracking_args("scott")
    def distill_and_release(teacher):
        """Per-method sweeps -> three students -> evaluation -> the winner gated, registered, deployed."""
        methods = ("cd-ode", "scott", "scott-adv")

        def adversary(method: str) -> str:
            # Only SCott+adv has a discriminator: the others keep the default, so their steps stay cached when an
            # ablation run changes it.
            return discriminator if method == "scott-adv" else "teacher"
        with dsl.ParallelFor(items=sweep_workers, parallelism=4) as worker:
            trials = {m: sweep_worker(teacher=teacher, dataset=dataset, feature_net=feature_net.outputs["feature_net"],
                                      method=m, worker=worker, n_trials=trials_per_worker, search_space=search_space,
                                      trial_steps=trial_steps, trial_rungs=trial_rungs, batch_size=distill_batch_size,
                                      solver_substeps=solver_substeps, skip=skip, guidance_scale=guidance_scale,
                                      discriminator=adversary(m), eval_per_class=sweep_eval_per_class, seed=seed,
                                      **t).set_display_name(f"sweep-{m}") for m in methods}
        students = {}
        for m in methods:
            best = select_best(results=dsl.Collected(trials[m].outputs["Output"]), method=m,
                               **t).set_display_name(f"select-best-{m}")
            students[m] = distill(teacher=teacher, dataset=dataset, method=m, steps=distill_steps,
                                  batch_size=distill_batch_size, lr=best.outputs["lr"],
                                  noise_strength=best.outputs["noise_strength"], adv_weight=best.outputs["adv_weight"],
                                  solver_substeps=solver_substeps, skip=skip, guidance_scale=guidance_scale,
                                  discriminator=adversary(m), seed=seed, **t).set_display_name(f"distill-{m}")
        evaluation = evaluate_students(teacher=teacher, cd_ode=students["cd-ode"].outputs["student"],
                                       scott=students["scott"].outputs["student"],
                                       scott_adv=students["scott-adv"].outputs["student"], dataset=dataset,
                                       feature_net=feature_net.outputs["feature_net"], teacher_steps=teacher_eval_steps,
                                       student_steps=student_eval_steps, num_per_class=eval_per_class,
                                       guidance_scale=guidance_scale, seed=seed, **t)
        decision = gate(metrics=evaluation.outputs["metrics"], model_name=model_name, thresholds=gate_thresholds,
                        directions={"fd": "min", "cond_acc": "max"}, **t).set_caching_options(False)
        with dsl.If(decision.outputs["Output"] == True):  # noqa: E712 (KFP condition, not a Python bool)
            version = register(model=evaluation.outputs["released"], metrics=evaluation.outputs["metrics"],
                               model_name=model_name, **t).set_caching_options(False)
            deploy(model_name=model_name, version=version.output, kind="text-to-image", gpu=gpu,
                   **t).set_caching_options(False)

    # The exit handler ends the MLflow parent run with the pipeline's state, whatever happened inside.
    with dsl.ExitHandler(finish_run(**t).set_caching_options(False), name="tracked"):
        data = prepare_image_captions(sources=sources, resolution=resolution, per_class=per_class,
                                      holdout_fraction=holdout_fraction, seed=seed, dataset_uri=dataset_uri, **t)
        checked = validate_image_captions(dataset=data.outputs["dataset"], balance_tolerance=balance_tolerance, **t)
        dataset = data.outputs["dataset"]
        feature_net = train_feature_net(dataset=dataset, steps=feature_steps, seed=seed, **t).after(checked)

        # The same downstream DAG in both branches: the local runner cannot merge branch outputs (dsl.OneOf).
        with dsl.If(teacher_uri == "", name="train-teacher"):
            vae = train_vae(dataset=dataset, steps=vae_steps, batch_size=vae_batch_size, lr=vae_lr, seed=seed,
                            **t).after(checked)
            unet = train_unet(dataset=dataset, vae=vae.outputs["vae"], steps=unet_steps, batch_size=unet_batch_size,
                              lr=unet_lr, cond_dropout=cond_dropout, seed=seed, **t)
            distill_and_release(unet.outputs["model"])
        with dsl.Else(name="import-teacher"):
            imported = dsl.importer(artifact_uri=teacher_uri, artifact_class=Model, reimport=False).after(checked)
            distill_and_release(imported.output)
    configure_pipeline_tasks()  # ConfigMap/Secret env, image, resources, retries (platform/pods.py)
