"""SMDP navigation: the SMDP advantage against hand-computed values, the naive ablation equal to it when every
decision is one tick, decisions cut short by a collision, scenario validation, a short DPPO run that learns."""

from __future__ import annotations

import numpy as np
import pytest

from distillery.papers.smdp_nav import NavConfig, NavVecEnv, naive_advantages, smdp_advantages
from distillery.papers.smdp_nav import scenarios as S
from distillery.rl.ppo import PPOConfig, gae

G, LAM, TICK = 0.9, 0.8, 0.1


def test_smdp_advantage_hand_computed_with_a_cut_short_decision_and_a_terminal():
    """Decision 0 lasts its full 0.3 s (3 ticks of reward 1); decision 1 asked for 0.5 s but a collision ended it
    after 2 ticks (rewards 0.5 then -10), terminal. V(s0) = 2, V(s1) = 3, the bootstrap after the terminal is 100
    and must be ignored."""
    g = G ** 0.1
    r0 = 1 + g + g ** 2
    r1 = 0.5 + g * -10
    a1 = r1 - 3.0  # terminal: no bootstrap, no recursion
    a0 = (r0 + G ** 0.3 * 3.0 - 2.0) + G ** 0.3 * LAM * a1
    adv, ret = smdp_advantages(np.array([[r0], [r1]]), np.array([[0.3], [0.2]]), np.array([[2.0], [3.0]]),
                               np.array([[3.0], [100.0]]), np.array([[0.0], [1.0]]), G, LAM)
    assert adv[:, 0] == pytest.approx([a0, a1], abs=1e-12)
    assert ret[:, 0] == pytest.approx([a0 + 2.0, a1 + 3.0], abs=1e-12)
    # The naive estimator discounts decision 0 by one tick only: a different, larger bootstrap.
    naive, _ = naive_advantages(np.array([[3.0], [-9.5]]), TICK, np.array([[2.0], [3.0]]), np.array([[3.0], [100.0]]),
                                np.array([[0.0], [1.0]]), G, LAM)
    assert naive[1, 0] == pytest.approx(-9.5 - 3.0)
    assert naive[0, 0] == pytest.approx(3.0 + g * 3.0 - 2.0 + g * LAM * naive[1, 0])
    with pytest.raises(ValueError, match="> 0 seconds"):
        smdp_advantages(np.zeros((1, 1)), np.zeros((1, 1)), np.zeros((1, 1)), np.zeros((1, 1)), np.zeros((1, 1)), G, LAM)


def test_naive_equals_smdp_when_every_decision_is_one_tick():
    rng = np.random.default_rng(0)
    shape = (50, 4)
    r, v, nv = rng.normal(size=shape), rng.normal(size=shape), rng.normal(size=shape)
    d = (rng.random(shape) < 0.1).astype(float)
    smdp = smdp_advantages(r, np.full(shape, TICK), v, nv, d, G, LAM)
    naive = naive_advantages(r, TICK, v, nv, d, G, LAM)
    plain = gae(r, v, nv, d, np.full(shape, G ** TICK), LAM)
    for a, b in zip(smdp, naive):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    np.testing.assert_allclose(smdp[0], plain[0], atol=1e-12)


def _one(start, goal, obstacles=(), moving=()):
    """A scenario set of one scenario: obstacles (x, y, r), moving ones (x, y, r, vx, vy)."""
    m = max(1, len(obstacles) + len(moving))
    pos, vel, rad, mv = np.zeros((1, m, 2)), np.zeros((1, m, 2)), np.zeros((1, m)), np.zeros((1, m), bool)
    for i, o in enumerate([*obstacles, *moving]):
        pos[0, i], rad[0, i] = o[:2], o[2]
        if len(o) > 3:
            vel[0, i], mv[0, i] = o[3:], True
    return {"start": np.array([start], float), "goal": np.array([goal], float), "obs_pos": pos, "obs_vel": vel,
            "obs_r": rad, "moving": mv, "level": np.zeros(1, int), "levels": np.array(["test"])}


def test_a_collision_cuts_the_decision_short_and_the_rewards_are_discounted_per_tick():
    cfg = NavConfig()
    # Facing an obstacle 0.45 m ahead (surface to robot edge 0.05 m) at full speed, holding for 1 s.
    arrays = _one([2.0, 5.0, 0.0], [8.0, 8.0], obstacles=[(2.65, 5.0, 0.4)])
    env = NavVecEnv(arrays, cfg, 1, gamma=G, autoreset=False)
    env.reset(options={"scenarios": [0]})
    _, r, term, trunc, info = env.step(np.array([[1.0, 0.0, 1.0]]))
    assert info["collided"][0] and term[0] and not trunc[0]
    assert info["ticks"][0] == 1 and info["duration"][0] == pytest.approx(0.1)  # asked for 1.0 s
    assert r[0] == pytest.approx(cfg.collision_reward - cfg.time_penalty * 0.1 +
                                 (np.linalg.norm([6, 3]) - np.linalg.norm([5.9, 3])), abs=1e-5)
    # A free 0.5 s decision: 5 ticks, the discounted sum weights tick j by gamma^(j tick).
    env = NavVecEnv(_one([2.0, 5.0, 0.0], [8.0, 5.0]), cfg, 1, gamma=G, autoreset=False)
    env.reset(options={"scenarios": [0]})
    a = np.array([[0.0, 0.0, (0.5 - cfg.tau_min) / (cfg.tau_max - cfg.tau_min) * 2 - 1]])
    _, r, _, _, info = env.step(a)
    per_tick = 0.5 * 0.1 - cfg.time_penalty * 0.1  # v = 0.5 m/s straight at the goal
    assert info["ticks"][0] == 5 and r[0] == pytest.approx(5 * per_tick)
    assert info["reward_disc"][0] == pytest.approx(per_tick * sum(G ** (j * 0.1) for j in range(5)))


def test_scenario_validation_rejects_unreachable_goals_and_densities_out_of_range():
    cfg = NavConfig()
    ring = [(8.0 + 1.0 * np.cos(a), 5.0 + 1.0 * np.sin(a), 0.3) for a in np.linspace(0, 2 * np.pi, 16, endpoint=False)]
    walled_in = S.scenario(_one([1.5, 5.0, 0.0], [8.0, 5.0], obstacles=ring), 0)
    assert S.problems(walled_in, cfg) == ["goal not reachable from the start"]
    # The same ring of MOVING obstacles does not wall the goal in for good.
    moving = S.scenario(_one([1.5, 5.0, 0.0], [8.0, 5.0], moving=[(*o, 0.1, 0.0) for o in ring]), 0)
    assert S.problems(moving, cfg) == []
    assert any("density" in p for p in S.problems(moving, cfg, (0.0, 0.01)))
    assert any("overlaps" in p for p in S.problems(S.scenario(_one([1.5, 5.0, 0], [8, 5], [(8.1, 5, 0.3)]), 0), cfg))
    arrays = S.generate(3, seed=0, cfg=cfg)
    assert len(arrays["start"]) == 9 and S.validate(arrays, cfg, 0.005, 0.2)["invalid"] == {}
    bad = {k: v.copy() for k, v in arrays.items()}  # scenario 4 walled in by a ring of static obstacles
    bad["start"][4], bad["goal"][4] = [1.5, 5.0, 0.0], [8.0, 5.0]
    bad["obs_r"][4] = 0.0
    bad["obs_pos"][4, :16], bad["obs_r"][4, :16], bad["moving"][4, :16] = np.array(ring)[:, :2], 0.3, False
    report = S.validate(bad, cfg, 0.005, 0.2)
    assert report["invalid"] == {4: ["goal not reachable from the start"]}


@pytest.mark.slow
def test_dppo_learns_to_reach_goals_in_one_process(tmp_path, home):
    """A short adaptive SMDP run on easy scenarios: the training success rate rises well above a random policy's."""
    from distillery.papers.smdp_nav.policy import NavPolicy
    from distillery.papers.smdp_nav.train import train_policy

    cfg = NavConfig()
    arrays = S.generate(20, seed=0, cfg=cfg, levels={"sparse": (3, 0)})
    m = train_policy(arrays, tmp_path / "p", cfg, PPOConfig(num_envs=16), variant="smdp", sim_budget_s=12_000,
                     rollout_s=20.0, seed=0)
    assert m["sim_seconds"] >= 12_000 and m["final_success_rate"] > 0.3, m
    policy = NavPolicy(tmp_path / "p")
    v, w, tau = policy.command(np.full((3, cfg.beams), 4.0), [5.0, 2.0, 3.0], [0.0, 1.0, -1.0], [0, 0, 0], [0, 0, 0])
    assert ((0 <= v) & (v <= cfg.v_max)).all() and ((cfg.tau_min - 1e-9 <= tau) & (tau <= cfg.tau_max + 1e-9)).all()


@pytest.mark.slow
def test_dppo_on_two_processes_ends_with_equal_weights(tmp_path):
    """torchrun, 2 CPU processes: each steps its own environments, DDP averages the gradients, so both end with
    the same weights and optimizer state; the simulated time is the budget of both together."""
    import json

    from test_training import _torchrun

    _torchrun("ddp_train_smdp.py", [tmp_path], tmp_path / "home")
    r0, r1 = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert r0["world_size"] == r1["world_size"] == 2 and r0["steps"] == r1["steps"] == 3  # 240 / (10 x 4 x 2)
    assert (r0["weights"], r0["optimizer"]) == (r1["weights"], r1["optimizer"]), "the ranks ended apart"
    assert r0["sim_seconds"] == r1["sim_seconds"] >= 240
    assert (tmp_path / "model" / "model.safetensors").exists()


def test_pipeline_parameters_are_checked_before_any_step_runs():
    from pipelines import registry
    from pipelines.params import ParameterError, resolve

    func = registry()["smdp-nav"]
    assert resolve("smdp-nav", func, "smoke", {})["fixed_tau_short"] == 0.1
    with pytest.raises(ParameterError, match="fixed_tau_short < fixed_tau_mid"):
        resolve("smdp-nav", func, "cpu", {"fixed_tau_short": 0.5, "fixed_tau_mid": 0.3})
    with pytest.raises(ParameterError, match="min_density"):
        resolve("smdp-nav", func, "cpu", {"min_density": 0.3, "max_density": 0.2})
