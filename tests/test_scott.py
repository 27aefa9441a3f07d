"""SCott's pieces: the stochastic teacher solver, the consistency parameterization, the discriminators and
adversarial losses, the distillation loop and the student it saves, the per-method multi-fidelity sweep and the
release of the winning method."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from dataclasses import replace

import numpy as np
import pytest
import torch

from distillery.models import tiny_sd
from distillery.papers import scott
from distillery.papers.scott import distillation as d
from distillery.papers.scott import evaluate as ev

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher")
    tiny_sd.build_pipeline(seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dataset():
    rng = np.random.default_rng(0)
    return types.SimpleNamespace(images=rng.integers(0, 255, (24, 32, 32, 3), dtype=np.uint8),
                                 captions=[f"a handwritten digit {i % 3}" for i in range(24)])


def _ddim(eta: float):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=True, prediction_type="epsilon")
    sched.set_timesteps(50)
    return sched


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_stochastic_step_is_ddim_with_eta(eta):
    """Our per-sample step equals diffusers' DDIMScheduler.step for the same eta and the same noise."""
    sched = _ddim(eta)
    g = torch.Generator().manual_seed(0)
    x, eps, z = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    ac = sched.alphas_cumprod
    for t in (999, 519, 39):
        want = sched.step(eps, t, x, eta=eta, variance_noise=z).prev_sample
        got = scott.stochastic_ddim_step(eps, x, ac[t], ac[t - 20], eta, z)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_sde_step_matches_ode_step_at_zero_noise_and_differs_otherwise():
    ac = _ddim(0).alphas_cumprod
    g = torch.Generator().manual_seed(1)
    x, eps, z = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    a_t, a_s = ac[torch.tensor([999, 500, 40])].view(-1, 1, 1, 1), ac[torch.tensor([979, 480, 20])].view(-1, 1, 1, 1)
    ode = a_s.sqrt() * d.predicted_x0(eps, x, a_t) + (1 - a_s).sqrt() * eps  # deterministic DDIM
    torch.testing.assert_close(scott.stochastic_ddim_step(eps, x, a_t, a_s, 0.0, z), ode)
    assert not torch.allclose(scott.stochastic_ddim_step(eps, x, a_t, a_s, 0.7, z), ode, atol=1e-3)


def test_multistep_teacher_solve_uses_substeps_and_is_deterministic_at_zero_noise(teacher_dir):
    pipe = d.load_teacher(teacher_dir)
    ac = pipe.scheduler.alphas_cumprod
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=g)
    cond = torch.randn(2, 16, 384, generator=g)
    t, s = torch.tensor([999, 39]), torch.tensor([979, 19])
    calls = []
    hook = pipe.unet.register_forward_hook(lambda m, a, o: calls.append(a[1].tolist()))
    kw = dict(guidance_scale=3.0, noise_strength=0.0, substeps=4)
    a = scott.teacher_solve(pipe.unet, x, t, s, cond, torch.zeros_like(cond), ac, **kw)
    b = scott.teacher_solve(pipe.unet, x, t, s, cond, torch.zeros_like(cond), ac, **kw)
    hook.remove()
    torch.testing.assert_close(a, b)
    # 4 sub-steps, each one guided call (uncond + cond rows) at evenly spaced timesteps
    assert [c[:2] for c in calls[:4]] == [[999, 39], [994, 34], [989, 29], [984, 24]]
    assert len(calls) == 8


def test_consistency_boundary_condition(teacher_dir):
    """f(x, 0) = x for any x: c_skip(0) = 1, c_out(0) = 0."""
    pipe = d.load_teacher(teacher_dir)
    sched = d.lcm_scheduler(pipe.scheduler.config, 20)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 8, 8, generator=g)
    cond = torch.randn(3, 16, 384, generator=g)
    with torch.no_grad():
        out = scott.consistency_fn(pipe.unet, x, torch.zeros(3, dtype=torch.long), cond, sched,
                                   sched.alphas_cumprod)
        far = scott.consistency_fn(pipe.unet, x, torch.full((3,), 999), cond, sched, sched.alphas_cumprod)
    torch.testing.assert_close(out, x)
    assert not torch.allclose(far, x, atol=1e-2)  # away from the boundary the network's estimate dominates


def test_discriminator_hinge_loss_values_and_training_signal():
    assert scott.discriminator_hinge_loss(torch.tensor([2.0, 1.0]), torch.tensor([-1.0, -3.0])).item() == 0.0
    assert scott.discriminator_hinge_loss(torch.tensor([0.0]), torch.tensor([0.0])).item() == pytest.approx(2.0)
    assert scott.generator_adversarial_loss(torch.tensor([1.0, 3.0])).item() == pytest.approx(-2.0)

    torch.manual_seed(0)
    disc = scott.LatentDiscriminator(latent_channels=4, text_dim=384)
    real, fake = torch.randn(8, 4, 8, 8) + 1.5, torch.randn(8, 4, 8, 8) - 1.5
    text, t = torch.randn(8, 16, 384), torch.randint(0, 1000, (8,))
    opt = torch.optim.Adam(disc.parameters(), lr=1e-3)
    first = None
    for _ in range(30):
        loss = scott.discriminator_hinge_loss(disc(real, text, t), disc(fake, text, t))
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first * 0.5
    assert (disc(real, text, t) > disc(fake, text, t)).float().mean() > 0.9
    # The generator loss moves fakes toward what the discriminator calls real.
    fake = fake.clone().requires_grad_(True)
    scott.generator_adversarial_loss(disc(fake, text, t)).backward()
    with torch.no_grad():
        moved = fake - 0.5 * fake.grad / fake.grad.norm()
    assert disc(moved, text, t).mean() > disc(fake, text, t).mean()


def test_config_methods_and_errors():
    assert scott.DistillConfig(method="cd-ode").effective().noise_strength == 0.0
    assert scott.DistillConfig(method="cd-ode").effective().solver_substeps == 1
    assert scott.DistillConfig(method="scott", adv_weight=0.3).effective().adv_weight == 0.0
    assert scott.DistillConfig(method="scott-adv", adv_weight=0.3).effective().adv_weight == 0.3
    with pytest.raises(ValueError, match="method must be one of") as e:
        scott.DistillConfig(method="lcm", noise_strength=2.0).check()
    assert "noise_strength must be in [0, 1]" in str(e.value)
    with pytest.raises(ValueError, match="skip must divide"):
        scott.DistillConfig(skip=30).check(1000)


def test_distill_trains_the_student_and_saves_a_few_step_pipeline(teacher_dir, dataset, tmp_path):
    out = tmp_path / "student"
    cfg = scott.DistillConfig(method="scott-adv", steps=3, batch_size=4, adv_weight=0.2)
    metrics = scott.distill(teacher_dir, dataset, out, cfg, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=1,
                            log_every=1)
    assert metrics["resumed_from_step"] == 0 and np.isfinite(metrics["distill_final_loss"])
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").exists()
    meta = json.loads((out / "distillery.json").read_text())
    assert meta["default_steps"] == 2 and meta["max_guidance"] == 1.0 and meta["method"] == "scott-adv"
    teacher = d.load_teacher(teacher_dir)
    student = d.load_teacher(out)
    changed = [k for k, v in student.unet.state_dict().items()
               if not torch.equal(v, teacher.unet.state_dict()[k])]
    assert changed, "distillation did not change the student"

    # Started again with the same checkpoint folder it resumes at the end instead of training again.
    again = scott.distill(teacher_dir, dataset, tmp_path / "again", cfg, checkpoint_dir=tmp_path / "ckpt",
                          checkpoint_every=1, log_every=1)
    assert again["resumed_from_step"] == 3

    # A fresh process loads it with diffusers alone and samples with the LCMScheduler at 1, 2 and 4 steps.
    code = ("import sys, torch; from diffusers import StableDiffusionPipeline\n"
            "p = StableDiffusionPipeline.from_pretrained(sys.argv[1])\n"
            "assert type(p.scheduler).__name__ == 'LCMScheduler', type(p.scheduler)\n"
            "n = []\n"
            "p.unet.register_forward_hook(lambda m, a, o: n.append(1))\n"
            "for k in (1, 2, 4):\n"
            "    img = p(['a handwritten digit 1'], num_inference_steps=k, guidance_scale=1.0, output_type='np',\n"
            "            generator=torch.Generator().manual_seed(0)).images\n"
            "    assert img.shape == (1, 32, 32, 3)\n"
            "print(len(n))\n")
    done = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "7"  # 1 + 2 + 4 UNet calls: guidance is distilled, not applied


def test_distill_rejects_a_dataset_of_the_wrong_resolution(teacher_dir, tmp_path):
    bad = types.SimpleNamespace(images=np.zeros((4, 16, 16, 3), np.uint8), captions=["a"] * 4)
    with pytest.raises(ValueError, match="resolution 32"):
        scott.distill(teacher_dir, bad, tmp_path / "s", scott.DistillConfig(steps=1))
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        scott.distill(tmp_path, bad, tmp_path / "s", scott.DistillConfig(steps=1))


def test_headline_and_table():
    rows = [{"model": m, "steps": k, "fd": fd, "cond_acc": 0.5, "latency_s": lat, "unet_evals_per_image": ev_}
            for m, k, fd, lat, ev_ in [("teacher", 25, 10.0, 0.5, 50), ("teacher", 50, 9.0, 1.0, 100),
                                       ("cd-ode", 2, 20.0, 0.02, 2), ("scott-adv", 1, 14.0, 0.01, 1),
                                       ("scott-adv", 2, 12.0, 0.02, 2), ("scott-adv", 4, 12.3, 0.04, 4)]]
    h = ev.headline(rows, "scott-adv")
    assert h["fd"] == 12.0 and h["fd_ratio_vs_teacher"] == pytest.approx(1.2)
    assert h["unet_eval_reduction"] == pytest.approx(25.0) and h["fd_ratio_vs_cd_ode"] == pytest.approx(0.6)
    assert h["monotone_in_steps"] == 1.0
    with pytest.raises(ValueError, match="no teacher row at 25 steps .it has \\[50\\]"):
        ev.headline(rows[1:], "scott-adv")  # never silently the teacher at 50
    table = ev.markdown(rows)
    assert table.count("\n") == len(rows) + 2 and "| scott-adv | 2 | 12.00 |" in table
    assert ev.row_key("scott-adv", 2) == "scott_adv_2step"


def test_interrupted_distillation_resumes_to_the_uninterrupted_student(teacher_dir, dataset, tmp_path):
    """Student, EMA target, discriminator, Adam and the sampling generator all come back from the checkpoint."""
    from safetensors.torch import load_file

    class Stop(Exception):
        pass

    def stop(_, step):
        if step == 3:
            raise Stop

    cfg = scott.DistillConfig(method="scott-adv", steps=4, batch_size=2, adv_weight=0.2)
    kw = dict(checkpoint_every=2, log_every=1)
    scott.distill(teacher_dir, dataset, tmp_path / "full", cfg, checkpoint_dir=tmp_path / "ck_full", **kw)
    with pytest.raises(Stop):
        scott.distill(teacher_dir, dataset, tmp_path / "resumed", cfg, checkpoint_dir=tmp_path / "ck", on_log=stop, **kw)
    again = scott.distill(teacher_dir, dataset, tmp_path / "resumed", cfg, checkpoint_dir=tmp_path / "ck", **kw)
    assert again["resumed_from_step"] == 2
    name = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(tmp_path / "full" / name), load_file(tmp_path / "resumed" / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_teacher_feature_discriminator_trains_only_its_heads_and_passes_gradients_to_the_student(teacher_dir):
    """Heads on the frozen teacher's features: the discriminator loss reaches only the heads, the generator loss
    reaches the student's sample through the teacher, and the teacher never changes."""
    teacher = d.load_teacher(teacher_dir).unet
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    torch.manual_seed(0)
    disc = scott.make_discriminator("teacher", teacher, 384)
    assert isinstance(disc, scott.TeacherFeatureDiscriminator) and disc.teacher is teacher
    assert not any(k.startswith(("_teacher", "teacher")) for k in disc.state_dict())  # checkpoints hold heads only
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in disc.parameters()}
    assert len(disc.heads) == len(teacher.down_blocks) + 1  # one head per down block and the mid block

    ac = d.load_teacher(teacher_dir).scheduler.alphas_cumprod
    g = torch.Generator().manual_seed(0)
    real = torch.randn(8, 4, 8, 8, generator=g) * 0.5 + 1.0
    text, t = torch.randn(8, 16, 384, generator=g), torch.randint(0, 1000, (8,), generator=g)
    opt = torch.optim.Adam(disc.parameters(), lr=2e-3)
    losses = []
    for _ in range(25):
        fake = (torch.randn(8, 4, 8, 8, generator=g) * 0.5 - 1.0).requires_grad_(True)
        g_loss, d_loss, stats = scott.adversarial_losses(disc, fake, real, text, t, torch.randn(8, 4, 8, 8, generator=g),
                                                         ac)
        assert set(stats) == {"disc_loss", "disc_accuracy", "adv_loss"}
        opt.zero_grad()
        d_loss.backward()
        assert fake.grad is None  # the discriminator's loss sees the fake detached
        assert all(p.grad is None for p in teacher.parameters())
        assert all(p.grad is not None for p in disc.heads.parameters())
        opt.step()
        losses.append(d_loss.item())
    assert np.mean(losses[-5:]) < np.mean(losses[:5])  # the heads learn to tell the two apart
    g_loss, _, _ = scott.adversarial_losses(disc, fake, real, text, t, torch.randn(8, 4, 8, 8, generator=g), ac)
    g_loss.backward(inputs=[fake])
    assert fake.grad is not None and fake.grad.abs().sum() > 0  # through the frozen teacher to the student
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    with pytest.raises(ValueError, match="needs the noise"):
        scott.adversarial_losses(disc, fake, real, text, t)
    with pytest.raises(ValueError, match="discriminator must be one of"):
        scott.make_discriminator("clip", teacher, 384)


@pytest.mark.parametrize("kind", ["teacher", "latent"])
def test_scott_adv_distills_with_either_discriminator(teacher_dir, dataset, tmp_path, kind):
    cfg = scott.DistillConfig(method="scott-adv", steps=2, batch_size=2, adv_weight=0.2, discriminator=kind)
    metrics = scott.distill(teacher_dir, dataset, tmp_path / "s", cfg, checkpoint_dir=tmp_path / "ck")
    assert np.isfinite(metrics["distill_final_loss"]) and metrics["adv_weight"] == 0.2
    from lightning.fabric.utilities.load import _lazy_load

    keys = list(_lazy_load(tmp_path / "ck" / "last.ckpt")["model"])
    disc_keys = [k for k in keys if k.startswith("discriminator.")]
    assert disc_keys and all(("heads." in k or "cond." in k) for k in disc_keys) == (kind == "teacher")
    with pytest.raises(ValueError, match="discriminator must be one of"):
        scott.DistillConfig(discriminator="clip").check()


def test_a_longer_run_continues_a_shorter_runs_checkpoint(teacher_dir, dataset, tmp_path):
    """What the sweep's rungs rely on: 2 steps, then continued to 4 from that checkpoint, equals 4 steps at once."""
    from safetensors.torch import load_file

    cfg = scott.DistillConfig(method="scott-adv", steps=4, batch_size=2, adv_weight=0.2)
    scott.distill(teacher_dir, dataset, tmp_path / "once", cfg, checkpoint_dir=tmp_path / "a")
    short = scott.distill(teacher_dir, dataset, tmp_path / "rungs", replace(cfg, steps=2), checkpoint_dir=tmp_path / "b")
    longer = scott.distill(teacher_dir, dataset, tmp_path / "rungs", cfg, checkpoint_dir=tmp_path / "b")
    assert short["resumed_from_step"] == 0 and longer["resumed_from_step"] == 2
    name = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(tmp_path / "once" / name), load_file(tmp_path / "rungs" / name)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="other settings"):  # another knob than steps is another run
        scott.distill(teacher_dir, dataset, tmp_path / "x", replace(cfg, lr=1e-3), checkpoint_dir=tmp_path / "b")


def test_each_method_tunes_its_own_knobs_and_gets_its_own_best(home):
    import optuna

    from distillery.platform import tracking
    from distillery.steps import scott as steps

    space = {"noise_strength": [0.0, 1.0], "adv_weight": [0.01, 0.5], "lr": [1e-5, 1e-3]}
    for method in scott.METHODS:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        trial = study.ask()
        assert set(steps.suggest(trial, method, space)) == set(steps.METHOD_KNOBS[method])
    reports = {"cd-ode": [{"best_value": 5.0, "best_params": {"lr": 1e-4}}, {"best_value": 4.0, "best_params": {"lr": 3e-4}}],
               "scott": [{"best_value": 3.0, "best_params": {"lr": 2e-4, "noise_strength": 0.4}},
                         json.dumps({"best_value": None, "best_params": {}})],  # a worker whose trials were all pruned
               "scott-adv": [{"best_value": 6.0, "best_params": {"lr": 5e-5, "noise_strength": 0.7, "adv_weight": 0.2}}]}
    with tracking.step_run("scott", "select-best", kfp_run_id="k"):
        best = {m: steps.select_best(results=r, method=m) for m, r in reports.items()}
    assert best["cd-ode"] == {"best_value": 4.0, "lr": 3e-4, "noise_strength": 0.0, "adv_weight": 0.0}
    assert best["scott"] == {"best_value": 3.0, "lr": 2e-4, "noise_strength": 0.4, "adv_weight": 0.0}
    assert best["scott-adv"] == {"best_value": 6.0, "lr": 5e-5, "noise_strength": 0.7, "adv_weight": 0.2}
    with pytest.raises(RuntimeError, match="no scott sweep trial completed"):
        steps.select_best(results=[{"best_value": None, "best_params": {}}], method="scott")
    with pytest.raises(ValueError, match="search_space must map"):
        steps.check_search_space({"lr": [1e-3, 1e-5], "noise_strength": [0, 1], "adv_weight": [0, 1]})


def test_successive_halving_prunes_weak_trials_so_survivors_train_to_the_end(home):
    """A tiny objective whose quality is known: trials report at the rungs, the pruner stops the weak ones early and
    only the good ones reach the last rung."""
    import optuna

    from distillery.platform import sweeps

    schedule = sweeps.rungs(27, 3)
    assert schedule == [3, 9, 27] and sweeps.rungs(4, 2) == [1, 4] and sweeps.rungs(10, 3) == [1, 3, 10]
    trained = {}

    def objective(trial):
        x = trial.suggest_float("x", -4, 4)
        for steps in schedule:  # the longer a trial trains, the closer to its final value (x - 1)^2
            trained[trial.number] = steps
            trial.report((x - 1) ** 2 + 3.0 / steps, steps)
            if steps < schedule[-1] and trial.should_prune():
                raise optuna.TrialPruned()
        return (x - 1) ** 2

    out = sweeps.run_worker("sha", objective, n_trials=12, pipeline="demo", sampler_seed=0,
                            pruner=sweeps.successive_halving(schedule[0]))
    study = optuna.load_study(study_name="sha", storage=sweeps.storage())
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert out["pruned"] == len(pruned) >= 4 and complete
    assert all(trained[t.number] == 27 for t in complete) and all(trained[t.number] < 27 for t in pruned)
    # what was pruned was worse at its last rung than the best trial there
    for t in pruned:
        step = t.last_step
        assert t.intermediate_values[step] >= min(c.intermediate_values[step] for c in complete)
    assert out["best_value"] == min(t.value for t in complete)


def test_the_release_is_the_winner_by_the_gates_metric():
    rows = [{"model": m, "steps": k, "fd": fd} for m, k, fd in
            [("teacher", 25, 5.0), ("cd-ode", 2, 4.5), ("scott", 2, 4.3), ("scott-adv", 2, 8.0), ("scott", 4, 1.0)]]
    assert ev.pick_winner(rows, ["cd-ode", "scott", "scott-adv"]) == "scott"
    rows[3]["fd"] = 4.0
    assert ev.pick_winner(rows, ["cd-ode", "scott", "scott-adv"]) == "scott-adv"
    with pytest.raises(ValueError, match="no 2-step row"):
        ev.pick_winner(rows[:3], ["cd-ode", "scott", "scott-adv"])
