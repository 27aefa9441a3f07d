"""teacher-prior: a privileged RL teacher, and a student on noisy proprioception that learns from its motion through
an adversarial prior and an auxiliary task (arXiv 2504.10390).

A biped (MuJoCo Walker2d-v5) walks on rough heightfield terrain with randomized friction, masses, motor strength and
pushes. The teacher is trained with PPO on privileged observations (terrain ahead, physical parameters, true
velocity, foot contacts); its rollouts are validated (ranges, episode lengths, no NaN). A sweep of parallel workers
sharing one Optuna study picks the style-reward and auxiliary weights. Six students start from the same
initialization and see only a short history of noisy proprioception: the method (a least-squares discriminator on
proprioceptive transitions rewards teacher-like motion, an auxiliary head predicts privileged quantities), without
the auxiliary head, without the discriminator, DAgger and plain behaviour cloning from the teacher, and PPO from
scratch. All are evaluated on held-out terrain, wider randomization and several noise levels; the method student
is gated, registered and deployed as a locomotion endpoint (observation history -> action), also exported to ONNX.
"""

from kfp import dsl
from kfp.dsl import Model

from components.common import deploy, finish_run, gate, register
from components.teacher_prior import (evaluate_locomotion, locomotion_env, select_prior_weights, sweep_prior_weights,
                                      teacher_rollouts, train_student, train_teacher, validate_rollouts)
from distillery.platform.pods import configure_pipeline_tasks
from pipelines.params import tracking_args


@dsl.pipeline(name="teacher-prior", description=__doc__.split("\n")[0])
def teacher_prior(
    episode_steps: int = 500,
    terrain_height: float = 0.05,
    push_force: float = 40.0,
    obs_noise: float = 1.0,
    history: int = 3,
    heights_ahead: int = 8,
    teacher_uri: str = "",
    teacher_steps: int = 1_000_000,
    student_steps: int = 600_000,
    rollout_steps: int = 128,
    num_envs: int = 8,
    lr: float = 3e-4,
    hidden: int = 64,
    rollout_episodes: int = 32,
    min_episode_length: int = 20,
    sweep_workers: list = [0, 1],
    trials_per_worker: int = 2,
    trial_steps: int = 100_000,
    sweep_eval_episodes: int = 8,
    eval_episodes: int = 32,
    noise_levels: list = [0.0, 1.0, 2.0],
    wide_factor: float = 1.5,
    render: bool = True,
    gate_thresholds: dict = {"return_ratio_vs_teacher": ["min", 0.5], "onnx_max_abs_diff": ["max", 1e-5]},
    model_name: str = "teacher-prior",
    gpu: bool = False,
    seed: int = 0,
):
    """Environment -> privileged teacher -> rollouts (validated) -> sweep -> six students -> evaluation -> gate ->
    register -> deploy the method student.

    Args:
        episode_steps: Control steps per episode (0.008 s each).
        terrain_height: Largest terrain bump in metres.
        push_force: Largest horizontal push on the torso in newtons.
        obs_noise: The student's proprioceptive noise (multiple of the per-feature scale).
        history: Frames of noisy proprioception the student sees.
        heights_ahead: Terrain samples ahead of the torso the teacher sees.
        teacher_uri: A saved teacher policy folder (path or s3://; trained on this environment) to learn from instead of training one.
        teacher_steps: Environment steps of the teacher's PPO (when no teacher_uri).
        student_steps: Environment steps of every student (the same budget for all).
        rollout_steps: Steps each environment runs per PPO iteration.
        num_envs: Environments stepped together.
        lr: Adam learning rate of the PPO policies.
        hidden: Width of the actor and critic MLPs.
        rollout_episodes: Teacher episodes recorded as the prior's real motion.
        min_episode_length: Validation: shortest teacher episode accepted.
        sweep_workers: One parallel sweep worker per item; all share one Optuna study.
        trials_per_worker: Trials each sweep worker runs.
        trial_steps: Environment steps a sweep trial trains the method student.
        sweep_eval_episodes: Episodes on validation terrain (neither trained on nor held out) scoring a trial.
        eval_episodes: Held-out episodes per policy and condition.
        noise_levels: Observation-noise levels of the evaluation (multiples of the per-feature scale).
        wide_factor: Evaluation randomization ranges this many times wider than training.
        render: Render a frame strip of an episode per policy (headless EGL; skipped without GL).
        gate_thresholds: Gate: metric -> ["max" or "min", bound]; return is the method student's on held-out terrain at the training noise; it must also not be worse than the champion's.
        model_name: Registered model name.
        gpu: Deploy the predictor with one GPU.
        seed: Random seed of every step.
    """
    t = tracking_args("teacher-prior")
    run = dict(rollout_steps=rollout_steps, num_envs=num_envs, lr=lr, hidden=hidden, seed=seed)

    def learn_from(env, teacher):
        """Rollouts (validated) -> sweep -> six students -> evaluation -> the method student gated and released."""
        rollouts = teacher_rollouts(env=env, teacher=teacher, episodes=rollout_episodes, seed=seed, **t)
        checked = validate_rollouts(rollouts=rollouts.outputs["rollouts"], min_length=min_episode_length, **t)
        with dsl.ParallelFor(items=sweep_workers, parallelism=4) as worker:
            trials = sweep_prior_weights(env=env, rollouts=rollouts.outputs["rollouts"], worker=worker,
                                         n_trials=trials_per_worker, trial_steps=trial_steps,
                                         eval_episodes=sweep_eval_episodes, **run, **t).after(checked)
        best = select_prior_weights(results=dsl.Collected(trials.outputs["Output"]), **t)
        common = dict(env=env, rollouts=rollouts.outputs["rollouts"], teacher=teacher, env_steps=student_steps,
                      w_style=best.outputs["w_style"], c_aux=best.outputs["c_aux"], **run)
        students = {}
        for variant in ("method", "no-aux", "no-disc", "dagger", "bc", "scratch"):
            students[variant] = train_student(variant=variant, **common, **t).set_display_name(f"student-{variant}")
        evaluation = evaluate_locomotion(env=env, teacher=teacher, method=students["method"].outputs["student"],
                                         no_aux=students["no-aux"].outputs["student"],
                                         no_disc=students["no-disc"].outputs["student"],
                                         dagger=students["dagger"].outputs["student"],
                                         bc=students["bc"].outputs["student"],
                                         scratch=students["scratch"].outputs["student"], episodes=eval_episodes,
                                         noise_levels=noise_levels, wide_factor=wide_factor, render=render, **t)
        decision = gate(metrics=evaluation.outputs["metrics"], model_name=model_name, thresholds=gate_thresholds,
                        directions={"return": "max"}, **t).set_caching_options(False)
        with dsl.If(decision.outputs["Output"] == True):  # noqa: E712 (KFP condition, not a Python bool)
            version = register(model=students["method"].outputs["student"], metrics=evaluation.outputs["metrics"],
                               model_name=model_name, **t).set_caching_options(False)
            deploy(model_name=model_name, version=version.output, kind="locomotion", gpu=gpu,
                   **t).set_caching_options(False)

    # The exit handler ends the MLflow parent run with the pipeline's state, whatever happened inside.
    with dsl.ExitHandler(finish_run(**t).set_caching_options(False), name="tracked"):
        env = locomotion_env(episode_steps=episode_steps, terrain_height=terrain_height, push_force=push_force,
                             obs_noise=obs_noise, history=history, heights_ahead=heights_ahead, **t)
        # The same downstream DAG in both branches: the local runner cannot merge branch outputs (dsl.OneOf).
        with dsl.If(teacher_uri == "", name="train-teacher"):
            teacher = train_teacher(env=env.outputs["env"], env_steps=teacher_steps, **run, **t)
            learn_from(env.outputs["env"], teacher.outputs["teacher"])
        with dsl.Else(name="import-teacher"):
            imported = dsl.importer(artifact_uri=teacher_uri, artifact_class=Model, reimport=False)
            learn_from(env.outputs["env"], imported.output)
    configure_pipeline_tasks()  # ConfigMap/Secret env, image, resources, retries (platform/pods.py)
