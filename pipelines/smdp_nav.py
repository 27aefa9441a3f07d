"""smdp-nav: robot navigation with adaptive execution duration, learned with distributed PPO and SMDP advantages.

Scenario sets of a 2D world with static and moving obstacles at three densities are generated and validated
(start and goal free, goal reachable, obstacle density in range). Five policies get the same budget of simulated
time, trained in parallel with DPPO (each worker its own environments, gradients all-reduced): the adaptive policy
whose action (v, w, tau) includes its duration, trained with the SMDP advantage; the same with naive per-decision
discounting (ablation); and fixed-duration policies at three durations. All are evaluated in closed loop per
obstacle density (and in ir-sim with RVO crowds); the adaptive SMDP policy is gated on its success rate,
registered and deployed as a navigation endpoint (lidar scan + goal + velocity -> v, w, duration).
"""

from kfp import dsl

from components.common import deploy, finish_run, gate, register
from components.smdp_nav import evaluate_navigation, generate_scenarios, train_navigation, validate_scenarios
from distillery.platform.pods import configure_pipeline_tasks
from pipelines.params import tracking_args


@dsl.pipeline(name="smdp-nav", description=__doc__.split("\n")[0])
def smdp_nav(
    train_per_level: int = 200,
    eval_per_level: int = 50,
    min_density: float = 0.005,
    max_density: float = 0.2,
    sim_budget_s: float = 200_000.0,
    rollout_s: float = 20.0,
    num_envs: int = 16,
    lr: float = 3e-4,
    hidden: int = 128,
    gamma: float = 0.9,
    fixed_tau_short: float = 0.1,
    fixed_tau_mid: float = 0.3,
    fixed_tau_long: float = 0.8,
    irsim_scenarios: int = 20,
    gate_thresholds: dict = {"success_rate": ["min", 0.6]},
    model_name: str = "smdp-nav",
    gpu: bool = False,
    seed: int = 0,
):
    """Generate scenarios, train adaptive (SMDP, naive) and fixed-duration policies with DPPO, evaluate, gate,
    register and deploy the adaptive SMDP policy.

    Args:
        train_per_level: Training scenarios per obstacle density level (sparse, medium, crowded).
        eval_per_level: Evaluation scenarios per level (another seed; one episode each).
        min_density: Validation: least fraction of the arena covered by obstacles.
        max_density: Validation: largest fraction of the arena covered by obstacles.
        sim_budget_s: Simulated seconds every policy trains for (all workers together).
        rollout_s: Simulated seconds each environment lives per PPO iteration.
        num_envs: Environments per DPPO worker.
        lr: Adam learning rate.
        hidden: Width of the actor and critic MLPs.
        gamma: Discount per simulated second.
        fixed_tau_short: Duration (s) of the shortest fixed-duration baseline.
        fixed_tau_mid: Duration (s) of the middle fixed-duration baseline.
        fixed_tau_long: Duration (s) of the longest fixed-duration baseline.
        irsim_scenarios: Episodes per policy in ir-sim (0 skips the cross-simulator check).
        gate_thresholds: Gate: metric -> ["max" or "min", bound]; success_rate is the adaptive SMDP policy's on the evaluation scenarios; it must also not be worse than the champion's.
        model_name: Registered model name.
        gpu: Deploy the predictor with one GPU.
        seed: Random seed of every step.
    """
    t = tracking_args("smdp-nav")
    # The exit handler ends the MLflow parent run with the pipeline's state, whatever happened inside.
    with dsl.ExitHandler(finish_run(**t).set_caching_options(False), name="tracked"):
        scen = generate_scenarios(train_per_level=train_per_level, eval_per_level=eval_per_level, seed=seed, **t)
        checked = validate_scenarios(scenarios=scen.outputs["scenarios"], min_density=min_density,
                                     max_density=max_density, **t)
        common = dict(scenarios=scen.outputs["scenarios"], sim_budget_s=sim_budget_s, rollout_s=rollout_s,
                      num_envs=num_envs, lr=lr, hidden=hidden, gamma=gamma, seed=seed)
        smdp = train_navigation(variant="smdp", fixed_tau=0.0, **common, **t).after(checked)
        smdp.set_display_name("train-adaptive-smdp")
        naive = train_navigation(variant="naive", fixed_tau=0.0, **common, **t).after(checked)
        naive.set_display_name("train-adaptive-naive")
        fixed = []
        for name, tau in (("short", fixed_tau_short), ("mid", fixed_tau_mid), ("long", fixed_tau_long)):
            task = train_navigation(variant="fixed", fixed_tau=tau, **common, **t).after(checked)
            task.set_display_name(f"train-fixed-{name}")
            fixed.append(task)
        evaluation = evaluate_navigation(scenarios=scen.outputs["scenarios"], smdp_policy=smdp.outputs["policy"],
                                         naive_policy=naive.outputs["policy"], fixed_short=fixed[0].outputs["policy"],
                                         fixed_mid=fixed[1].outputs["policy"], fixed_long=fixed[2].outputs["policy"],
                                         fixed_taus=[fixed_tau_short, fixed_tau_mid, fixed_tau_long],
                                         irsim_scenarios=irsim_scenarios, **t)
        decision = gate(metrics=evaluation.outputs["metrics"], model_name=model_name, thresholds=gate_thresholds,
                        directions={"success_rate": "max"}, **t).set_caching_options(False)
        with dsl.If(decision.outputs["Output"] == True):  # noqa: E712 (KFP condition, not a Python bool)
            version = register(model=smdp.outputs["policy"], metrics=evaluation.outputs["metrics"],
                               model_name=model_name, **t).set_caching_options(False)
            deploy(model_name=model_name, version=version.output, kind="navigation", gpu=gpu,
                   **t).set_caching_options(False)
    configure_pipeline_tasks()  # ConfigMap/Secret env, image, resources, retries (platform/pods.py)
