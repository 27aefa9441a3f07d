"""mode: a mixture-of-denoising-experts diffusion policy for Meta-World MT10, with expert caching.

Demonstrations come from MT10's scripted experts (successful episodes only, each with its task's language
instruction) and are validated with Great Expectations. A diffusion transformer over action chunks, conditioned
on the observation history and the MiniLM embedding of the instruction, is trained with EDM's denoising loss;
its feed-forward layers are experts routed by the noise level alone, with a noise token in self-attention and a
load-balancing loss. A dense transformer with the same active size is trained beside it. Both are evaluated in
closed loop in the simulator; MoDE is sampled with its experts precomputed and fused per denoising step (expert
caching), which gives the same actions for less work. MoDE is gated on its success rate, registered and
deployed as a policy endpoint.
"""

from kfp import dsl

from components.common import deploy, finish_run, gate, register
from components.mode import collect_demos, evaluate_policies, train_policy, validate_demos
from distillery.platform.pods import configure_pipeline_tasks
from pipelines.params import tracking_args


@dsl.pipeline(name="mode", description=__doc__.split("\n")[0])
def mode(
    episodes_per_task: int = 20,
    demos_uri: str = "",
    min_episodes_per_task: int = 1,
    width: int = 128,
    depth: int = 4,
    num_experts: int = 4,
    top_k: int = 2,
    expert_hidden: int = 256,
    chunk: int = 8,
    obs_history: int = 2,
    train_steps: int = 5000,
    batch_size: int = 256,
    lr: float = 3e-4,
    sampling_steps: int = 10,
    eval_episodes_per_task: int = 5,
    eval_max_steps: int = 500,
    execute: int = 4,
    gate_thresholds: dict = {"success_rate": ["min", 0.5], "cached_matches_uncached": ["min", 1.0]},
    model_name: str = "mode",
    gpu: bool = False,
    seed: int = 0,
):
    """Train, evaluate, gate, register and deploy a MoDE policy on Meta-World MT10.

    Args:
        episodes_per_task: Successful scripted-expert episodes collected per MT10 task.
        demos_uri: Use these demonstrations (path or s3://, e.g. the DVC-tracked demos/mt10) instead of rolling out
            the scripted experts.
        min_episodes_per_task: Validation: fewest episodes a task may have.
        width: Transformer width.
        depth: Transformer blocks.
        num_experts: Experts per MoE feed-forward layer.
        top_k: Experts used per denoising step (the dense baseline's FFN is top_k x expert_hidden wide).
        expert_hidden: Hidden size of one expert.
        chunk: Actions predicted per call (the action chunk).
        obs_history: Observations the policy sees per call.
        train_steps: Training steps of each policy.
        batch_size: Training batch size.
        lr: Learning rate.
        sampling_steps: DDIM denoising steps per action chunk (the schedule the expert cache is built for).
        eval_episodes_per_task: Closed-loop evaluation episodes per task (fixed seeds).
        eval_max_steps: Step limit of an evaluation episode.
        execute: Actions of each predicted chunk executed before predicting again.
        gate_thresholds: Gate: metric -> ["max" or "min", bound]. success_rate is the served MoDE's on MT10 variations the demonstrations did not cover; cached_matches_uncached (1 = the served expert cache gives uncached MoDE's actions) must hold; MoDE must also not be worse than the champion's success rate.
        model_name: Registered model name.
        gpu: Deploy the predictor with one GPU.
        seed: Random seed of every step.
    """
    t = tracking_args("mode")
    # The exit handler ends the MLflow parent run with the pipeline's state, whatever happened inside.
    with dsl.ExitHandler(finish_run(**t).set_caching_options(False), name="tracked"):
        demos = collect_demos(episodes_per_task=episodes_per_task, seed=seed, demos_uri=demos_uri, **t)
        checked = validate_demos(demos=demos.outputs["demos"], min_episodes_per_task=min_episodes_per_task, **t)
        arch = dict(width=width, depth=depth, num_experts=num_experts, top_k=top_k, expert_hidden=expert_hidden,
                    chunk=chunk, obs_history=obs_history, steps=train_steps, batch_size=batch_size, lr=lr,
                    sampling_steps=sampling_steps, seed=seed)
        moe = train_policy(demos=demos.outputs["demos"], dense=False, **arch, **t).after(checked)
        moe.set_display_name("train-mode")
        dense = train_policy(demos=demos.outputs["demos"], dense=True, **arch, **t).after(checked)
        dense.set_display_name("train-dense")
        evaluation = evaluate_policies(mode_policy=moe.outputs["policy"], dense_policy=dense.outputs["policy"],
                                       episodes_per_task=eval_episodes_per_task, max_steps=eval_max_steps,
                                       execute=execute, seed=seed, **t)
        decision = gate(metrics=evaluation.outputs["metrics"], model_name=model_name, thresholds=gate_thresholds,
                        directions={"success_rate": "max"}, **t).set_caching_options(False)
        with dsl.If(decision.outputs["Output"] == True):  # noqa: E712 (KFP condition, not a Python bool)
            version = register(model=moe.outputs["policy"], metrics=evaluation.outputs["metrics"],
                               model_name=model_name, **t).set_caching_options(False)
            deploy(model_name=model_name, version=version.output, kind="policy", gpu=gpu,
                   **t).set_caching_options(False)
    configure_pipeline_tasks()  # ConfigMap/Secret env, image, resources, retries (platform/pods.py)
