"""teacher-prior: the style reward's bounds, the least-squares discriminator loss against hand values, privileged
information kept out of the student's and the discriminator's inputs (shapes and construction), the GX suite
rejecting corrupted rollouts by name, the PPO core learning a standard task, and a tiny run of the whole method
(teacher, rollouts, every student from the same initialization, ONNX parity, evaluation)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from distillery.papers.teacher_prior import Discriminator, TerrainConfig, TerrainVecEnv, discriminator_loss, style_reward
from distillery.papers.teacher_prior.env import ACT, FRAME, PROPRIO, observe
from distillery.rl.ppo import PPOConfig

TINY = TerrainConfig(episode_steps=30, history=2, heights_ahead=4)


def test_style_reward_is_one_at_the_teacher_zero_at_the_student_and_bounded():
    d = torch.tensor([1.0, 0.0, -1.0, 3.0, -5.0, 2.0])
    assert style_reward(d).tolist() == pytest.approx([1.0, 0.75, 0.0, 0.0, 0.0, 0.75])
    r = style_reward(torch.randn(10_000) * 4)
    assert r.min() >= 0.0 and r.max() <= 1.0


def test_discriminator_loss_least_squares_and_gradient_penalty_by_hand():
    """A discriminator whose last layer is a constant b: L = (b - 1)^2 + (b + 1)^2, no gradient, accuracy 1/2."""
    disc = Discriminator(PROPRIO, 8)
    last = disc.net[-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.constant_(last.bias, 0.5)
    real = (torch.randn(16, PROPRIO), torch.randn(16, PROPRIO))
    fake = (torch.randn(16, PROPRIO), torch.randn(16, PROPRIO))
    loss, stats = discriminator_loss(disc, real, fake, gp_weight=5.0)
    assert float(loss) == pytest.approx(0.25 + 2.25)
    assert stats["disc_grad_penalty"] == 0.0 and stats["disc_accuracy"] == 0.5
    # With a live last layer the penalty is the squared input gradient of D on the teacher samples.
    torch.nn.init.normal_(last.weight)
    loss, stats = discriminator_loss(disc, real, fake, gp_weight=5.0)
    s, sn = (x.clone().requires_grad_(True) for x in real)
    g = torch.autograd.grad(disc(s, sn).sum(), (s, sn))
    gp = float(sum((x ** 2).sum(-1) for x in g).mean())
    assert stats["disc_grad_penalty"] == pytest.approx(gp, rel=1e-5)
    assert float(loss) == pytest.approx(stats["disc_ls_loss"] + 5.0 * gp, rel=1e-5)


def test_privileged_information_never_reaches_the_student_or_the_discriminator():
    env = TerrainVecEnv(TINY, 2, seed=0, obs_noise=0.0)
    obs = env.reset()
    assert obs["student"].shape == (2, TINY.history * FRAME) and obs["proprio"].shape == (2, PROPRIO)
    assert obs["teacher"].shape == (2, FRAME + TINY.privileged_dim) and TINY.privileged_dim == 4 + 9
    # By construction: change everything privileged (terrain, friction, masses, motors, a push) under the same
    # joint state; the student's frame and the proprioception stay identical, the privileged part does not.
    w = env.walkers[0]
    s = w.state()
    before = observe(TINY, w, s, np.zeros(ACT), np.zeros(PROPRIO))
    w.heights = w.heights + np.linspace(0, 0.2, len(w.heights))
    w.params, w.push, w.push_left = np.array([1.9, 0.5, 1.7]), 30.0, 3
    after = observe(TINY, w, {**s, "vel": s["vel"] + 1.0, "height": s["height"] + 0.3}, np.zeros(ACT),
                    np.zeros(PROPRIO))
    np.testing.assert_array_equal(before["frame"], after["frame"])
    np.testing.assert_array_equal(before["proprio"], after["proprio"])
    assert not np.allclose(before["privileged"], after["privileged"])
    # The discriminator's input is two proprio vectors: a privileged-sized input is refused.
    disc = Discriminator(PROPRIO, 8)
    assert disc.net[0].in_features == 2 * PROPRIO
    with pytest.raises(ValueError, match="proprioceptive"):
        disc(torch.zeros(1, TINY.teacher_dim), torch.zeros(1, TINY.teacher_dim))


def test_task_reward_pays_tracking_the_command_clearly_more_than_standing_still():
    """Walking at the commanded velocity earns several times what standing upright does, at every command of the
    range; missing the command either way costs; falling loses the alive bonus. The environment's reward is this
    function (a few steps of it, recomputed from what step reports)."""
    from distillery.papers.teacher_prior.env import ALIVE_BONUS, PROGRESS_WEIGHT, task_reward

    still = np.zeros(ACT)
    commands = np.linspace(*TINY.command, 21)
    walking = task_reward(True, commands, commands, still)
    standing = task_reward(True, 0.0, commands, still)
    assert walking == pytest.approx(np.full(21, ALIVE_BONUS + 1.0 + PROGRESS_WEIGHT))
    assert (walking - standing >= 1.0).all() and walking.mean() >= 3 * standing.mean()
    assert (task_reward(True, commands + 0.5, commands, still) < walking).all()  # overshooting pays no more
    assert (task_reward(True, commands - 0.5, commands, still) < walking).all()
    assert (task_reward(True, -0.3, commands, still) < standing).all()  # walking backwards pays less than standing
    assert (task_reward(False, commands, commands, still) == pytest.approx(walking - ALIVE_BONUS))
    assert task_reward(True, 1.0, 1.0, np.ones(ACT)) < task_reward(True, 1.0, 1.0, still)

    env = TerrainVecEnv(TINY, 2, seed=0)
    env.reset()
    rng = np.random.default_rng(0)
    for _ in range(5):
        action = rng.uniform(-1, 1, (2, ACT))
        _, r, term, _, info = env.step(action)
        np.testing.assert_allclose(r, task_reward(~term, info["x_velocity"], info["command"], action), rtol=1e-6)


def test_config_checks_report_every_problem():
    with pytest.raises(ValueError, match="friction range.*history >= 1"):
        replace(TINY, friction=(1.5, 0.5), history=0).check()
    wide = TINY.widened(2.0)
    assert wide.friction[0] < TINY.friction[0] and wide.friction[1] > TINY.friction[1]
    assert wide.push_force == 2 * TINY.push_force


def _rollouts():
    """Hand-made valid rollouts: two episodes of 3 steps."""
    rng = np.random.default_rng(0)
    aux = np.tile([1.0, 0.0, 1.2, 1.0, 0.0, 1.0, 1.0, 1.0], (6, 1)).astype(np.float32)
    return {"proprio": rng.normal(size=(6, PROPRIO)).astype(np.float32),
            "proprio_next": rng.normal(size=(6, PROPRIO)).astype(np.float32), "aux": aux,
            "episode": np.array([0, 0, 0, 1, 1, 1]), "ep_length": np.array([3, 3]), "ep_return": np.array([5.0, 6.0]),
            "ep_distance": np.array([1.0, 1.2]), "ep_fell": np.array([False, True])}


def test_corrupted_rollouts_are_rejected_with_the_failing_expectations_named(tmp_path):
    from distillery.papers.teacher_prior import rollouts as R
    from distillery.platform.validation import DataValidationError, require_valid

    assert R.validate(_rollouts(), TINY, tmp_path / "ok.html", min_length=2).success
    bad = _rollouts()
    bad["proprio"][1, 3] = np.nan  # a NaN observation
    bad["aux"][4, 5] = 9.0  # friction scale far outside the training range
    bad["ep_length"][1] = 1  # an episode shorter than allowed, and no longer the steps stored for it
    result = R.validate(bad, TINY, tmp_path / "bad.html", min_length=2)
    failed = {(r.frame, r.name, r.column) for r in result.failed}
    assert failed == {("transitions", "expect_column_values_to_be_in_set", "has_nan"),
                      ("transitions", "expect_column_values_to_be_between", "proprio_absmax"),
                      ("transitions", "expect_column_values_to_be_between", "friction"),
                      ("episodes", "expect_column_values_to_be_between", "length"),
                      ("episodes", "expect_column_pair_values_to_be_equal", "length/steps_present")}
    with pytest.raises(DataValidationError, match="friction"):
        require_valid(result)
    assert "FAIL" in (tmp_path / "bad.html").read_text()


def test_ppo_core_learns_inverted_pendulum():
    """The shared PPO core (GAE + clipped update on Fabric) balances gymnasium's InvertedPendulum-v5: the mean
    episode length of a random policy is ~5 steps; within 64k steps the mean of 20 consecutive episodes reaches 150
    and the last 20 keep at least 50. Where in the run it gets there depends on the CPU's float kernels (32k steps on
    one machine, 53k on another), so the test bounds the budget, not the moment."""
    import gymnasium as gym

    from distillery.models.training import make_fabric
    from distillery.rl.ppo import ActorCritic, gae, ppo_update

    torch.manual_seed(0)
    torch.set_num_threads(1)
    fabric = make_fabric()
    n, T = 8, 64
    envs = gym.vector.SyncVectorEnv([lambda: gym.make("InvertedPendulum-v5") for _ in range(n)],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    cfg = PPOConfig(num_envs=n, hidden=32, epochs=10, minibatches=4, lr=1e-3, lam=0.95)
    net = ActorCritic(4, 1, cfg.hidden, init_log_std=0.0)
    model, opt = fabric.setup(net, torch.optim.Adam(net.parameters(), lr=cfg.lr))
    gen = torch.Generator().manual_seed(0)
    obs, _ = envs.reset(seed=0)
    lengths, t_ep, peak = [], np.zeros(n), 0.0
    for it in range(64_000 // (n * T)):
        b = {k: [] for k in ("obs", "actions", "logprobs", "values", "r", "done", "next_values")}
        for _ in range(T):
            x = torch.as_tensor(obs, dtype=torch.float32)
            with torch.no_grad():
                a, logp, _, v = net(x, generator=gen)
            obs, r, term, trunc, info = envs.step(a.numpy() * 3.0)  # actions in [-3, 3]
            final = obs.astype(np.float32)
            for i in np.flatnonzero(term | trunc):  # same-step autoreset: obs is already the next episode's
                final[i] = info["final_obs"][i]
            with torch.no_grad():
                nv = net.value(torch.as_tensor(final)).numpy()
            t_ep += 1
            lengths += list(t_ep[term | trunc])
            t_ep[term | trunc] = 0
            if len(lengths) >= 20:
                peak = max(peak, float(np.mean(lengths[-20:])))
            for k, val in (("obs", x.numpy()), ("actions", a.numpy()), ("logprobs", logp.numpy()),
                           ("values", v.numpy()), ("r", r), ("done", term), ("next_values", nv)):
                b[k].append(val)
        a_ = {k: np.asarray(v) for k, v in b.items()}
        adv, ret = gae(a_["r"], a_["values"], a_["next_values"], a_["done"].astype(float), np.full((T, n), 0.99),
                       cfg.lam)
        batch = {"obs": a_["obs"].reshape(-1, 4), "actions": a_["actions"].reshape(-1, 1),
                 "logprobs": a_["logprobs"].ravel(), "advantages": adv.ravel(), "returns": ret.ravel(),
                 "values": a_["values"].ravel()}
        ppo_update(fabric, model, opt, cfg, {k: torch.as_tensor(v, dtype=torch.float32) for k, v in batch.items()},
                   gen)
    assert peak >= 150 and np.mean(lengths[-20:]) >= 50, (peak, np.mean(lengths[-20:]))


def test_tiny_method_run_teacher_rollouts_students_onnx_and_evaluation(tmp_path, home):
    """Every student starts from the same actor-critic; the method student's discriminator and auxiliary head are
    stepped and logged; the deployed ONNX graph equals PyTorch; the DAgger student refuses a missing teacher, and the
    behaviour-cloning student always lets the teacher act."""
    import onnxruntime as ort

    from distillery.papers.teacher_prior import PriorConfig, train_dagger, train_ppo
    from distillery.papers.teacher_prior import evaluate as ev
    from distillery.papers.teacher_prior import rollouts as R
    from distillery.papers.teacher_prior.policy import ONNX_FILE, load_policy
    from distillery.papers.teacher_prior.train import new_student

    a, b = new_student(TINY, 16, -0.5, seed=3, aux=True), new_student(TINY, 16, -0.5, seed=3, aux=False)
    for (ka, va), (kb, vb) in zip(a.ac.state_dict().items(), b.ac.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    assert a.ac.actor[0].in_features == TINY.student_dim  # the policy's input is the history alone

    ppo = PPOConfig(num_envs=2, hidden=16, epochs=1, minibatches=2)
    train_ppo(tmp_path / "teacher", TINY, ppo, role="teacher", env_steps=120, rollout_steps=30)
    teacher = load_policy(tmp_path / "teacher", role="teacher")
    arrays = R.collect(teacher, TINY, 2, num_envs=2)
    m = train_ppo(tmp_path / "method", TINY, ppo, role="method", env_steps=120, rollout_steps=30, rollouts=arrays,
                  pc=PriorConfig(disc_hidden=8))
    assert {"final_disc_accuracy", "final_disc_grad_penalty", "final_aux_mse", "final_style_reward"} <= set(m)
    with pytest.raises(ValueError, match="needs the teacher's rollouts"):
        train_ppo(tmp_path / "x", TINY, ppo, role="no-aux", env_steps=60, rollout_steps=30)
    with pytest.raises(FileNotFoundError, match="policy.json missing"):
        train_dagger(tmp_path / "d", TINY, tmp_path / "no-teacher", hidden=16, env_steps=60, rollout_steps=30,
                     num_envs=2)
    logs = {}
    for role in ("dagger", "bc"):
        train_dagger(tmp_path / role, TINY, tmp_path / "teacher", hidden=16, env_steps=120, rollout_steps=30,
                     num_envs=2, role=role, on_log=lambda m, step, role=role: logs.setdefault(role, []).append(m),
                     log_every=1)
        assert load_policy(tmp_path / role).role == role
    # DAgger hands the wheel to the student (beta 0.5^i); behaviour cloning never does.
    assert [m["dagger_beta"] for m in logs["dagger"]] == [1.0, 0.5]
    assert [m["bc_beta"] for m in logs["bc"]] == [1.0, 1.0]
    with pytest.raises(ValueError, match="imitation student's role"):
        train_dagger(tmp_path / "x", TINY, tmp_path / "teacher", hidden=16, env_steps=60, rollout_steps=30,
                     num_envs=2, role="method")

    student = load_policy(tmp_path / "method")
    assert student.has_aux and len(student.meta["disc_curve"]) == 2 and student.meta["onnx_max_abs_diff"] <= 1e-5
    history = np.random.default_rng(0).normal(size=(5, TINY.history, FRAME)).astype(np.float32)
    onnx = ort.InferenceSession(str(tmp_path / "method" / ONNX_FILE), providers=["CPUExecutionProvider"])
    (inp,) = onnx.get_inputs()
    assert inp.name == "observations" and inp.shape[1:] == [TINY.history, FRAME]
    np.testing.assert_allclose(onnx.run(None, {"observations": history})[0], student.act_history(history), atol=1e-5)
    result = ev.run_episodes(student, TINY, 3, noise=1.0)
    s = ev.summarize(result)
    assert s["episodes"] == 3 and 0 <= s["fall_rate"] <= 1 and "aux_r2" in s
    assert (result["length"] >= 1).all() and (result["length"] <= TINY.episode_steps).all()
    assert ev.steps_to_fraction([[10, 1.0], [20, 5.0], [30, 10.0]], 0.4) == 20
    assert ev.steps_to_fraction([[10, 1.0], [20, 5.0], [30, 10.0]], 0.8, final=5.0) == 20  # another curve's bar
    assert ev.steps_to_fraction([[10, 1.0], [20, 2.0]], 0.8, final=10.0) == 20  # never reached: the last step
    assert ev.final_value([[i, float(i)] for i in range(10)]) == 7.0


def test_a_rerun_resumes_from_the_checkpoint_and_the_sweep_scores_on_its_own_terrain(tmp_path):
    """A PPO run that finds its finished checkpoint trains nothing and saves the same weights (the checkpoint once
    held Fabric's wrapper, which could not be loaded back); the sweep's validation terrain is disjoint from the
    training and the held-out evaluation terrain."""
    from distillery.papers.teacher_prior import PriorConfig, train_ppo
    from distillery.papers.teacher_prior.policy import load_policy
    from distillery.papers.teacher_prior.train import EVAL_SEEDS, TRAIN_SEEDS, VALID_SEEDS

    ppo = PPOConfig(num_envs=2, hidden=16, epochs=1, minibatches=2)
    run = dict(role="teacher", env_steps=120, rollout_steps=30, pc=PriorConfig(), checkpoint_dir=tmp_path / "ckpt")
    first = train_ppo(tmp_path / "a", TINY, ppo, **run)
    again = train_ppo(tmp_path / "b", TINY, ppo, **run)
    assert first["resumed_from_step"] == 0 and again["resumed_from_step"] == first["iterations"] == 2
    a, b = load_policy(tmp_path / "a").net.state_dict(), load_policy(tmp_path / "b").net.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ranges = sorted((TRAIN_SEEDS, EVAL_SEEDS, VALID_SEEDS))
    assert all(lo[1] <= hi[0] for lo, hi in zip(ranges, ranges[1:]))


def test_pipeline_parameters_are_checked_before_any_step_runs():
    from pipelines.params import ParameterError, resolve
    from pipelines.teacher_prior import teacher_prior as func  # this pipeline alone: each one builds its DAG on import
    assert resolve("teacher-prior", func, "smoke", {})["noise_levels"] == [0.0, 1.0]
    with pytest.raises(ParameterError, match="must include the training obs_noise"):
        resolve("teacher-prior", func, "cpu", {"noise_levels": [0.0, 2.0]})
    with pytest.raises(ParameterError, match="less than one PPO iteration"):
        resolve("teacher-prior", func, "cpu", {"student_steps": 100})
    with pytest.raises(ParameterError, match="terrain_height"):
        resolve("teacher-prior", func, "cpu", {"terrain_height": 0.5})
