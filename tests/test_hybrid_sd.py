"""Hybrid SD method on an untrained tiny SD (seconds): structural pruning, significance scores, the hybrid sampler,
the KD and tiny-VAE losses, the ONNX edge model."""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO


@pytest.fixture(scope="module")
def pipe():
    from distillery.models import tiny_sd

    p = tiny_sd.build_pipeline(tiny_sd.TinySDConfig(), seed=0)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def plan(pipe):
    from distillery.papers.hybrid_sd import pruning

    names = [c.name for c in pruning.candidates(pipe.unet)]
    return {n: pruning.TIER_RATIOS[i % 3] for i, n in enumerate(names)}


@pytest.fixture(scope="module")
def small(pipe, plan):
    from distillery.papers.hybrid_sd import pruning

    return pruning.prune(pipe.unet, plan)


def test_candidates_are_the_resnet_and_attention_blocks(pipe):
    from distillery.papers.hybrid_sd import pruning

    kinds = [c.kind for c in pruning.candidates(pipe.unet, remove_blocks=False)]
    assert kinds.count("resnet") == 8 and kinds.count("attention") == 4
    # Removed by default, so not scored: the mid block (2 ResNet blocks, 1 attention block) and the final up
    # stage's last ResNet + attention pair.
    gone = pruning.removed_blocks(pipe.unet)
    assert gone == ["mid_block", "up_blocks.1.resnets.1", "up_blocks.1.attentions.1"]
    names = [c.name for c in pruning.candidates(pipe.unet)]
    assert len(names) == 7 and not any(n.startswith(("mid_block", *gone)) for n in names)


def test_pruning_shrinks_as_configured_and_keeps_the_model_runnable(pipe, plan, small):
    from distillery.papers.hybrid_sd import pruning

    teacher, pruned = dict(pipe.unet.named_modules()), dict(small.named_modules())
    for name, ratio in plan.items():
        t, s = teacher[name], pruned[name]
        if type(t).__name__ == "ResnetBlock2D":
            groups = t.norm2.num_groups
            want = max(groups, round(t.conv1.out_channels * ratio / groups) * groups)
            assert s.conv1.out_channels == s.norm2.num_channels == s.conv2.in_channels == want
            assert s.time_emb_proj.out_features == want
            assert want % s.norm2.num_groups == 0 and s.norm2.num_groups == groups  # GroupNorm keeps its groups
            assert s.conv2.out_channels == t.conv2.out_channels  # the block's output width is untouched
        else:
            for a_t, a_s in zip(pruning._attentions(t), pruning._attentions(s)):
                assert a_s.heads == max(1, round(a_t.heads * ratio)) < a_t.heads
                assert a_s.to_q.out_features == a_s.heads * (a_t.to_q.out_features // a_t.heads)
            for f_t, f_s in zip(pruning._feed_forwards(t), pruning._feed_forwards(s)):  # GEGLU: value + gate rows
                units = round(f_t.net[2].in_features * ratio)
                assert f_s.net[2].in_features == units and f_s.net[0].proj.out_features == 2 * units
                assert f_s.net[2].out_features == f_t.net[2].out_features
    assert small.mid_block is None and pipe.unet.mid_block is not None  # BK-SDM-Small: the mid block is gone
    last, last_t = small.up_blocks[-1], pipe.unet.up_blocks[-1]  # and the final up stage's last pair
    assert (len(last.resnets), len(last.attentions), len(last_t.resnets), len(last_t.attentions)) == (1, 1, 2, 2)
    assert pruning.param_count(small) == pruning.planned_params(pipe.unet, plan) < pruning.param_count(pipe.unet)
    assert pruning.param_count(pipe.unet) == 3_357_444  # the teacher itself is untouched
    assert pruning.param_count(small) <= 0.5 * pruning.param_count(pipe.unet)
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 5, 384)
    with torch.no_grad():
        out = small(x, t, encoder_hidden_states=c).sample
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_default_tiers_halve_the_unet_whatever_the_scores(pipe):
    """Every way the scores can tier the candidates (thirds at 0.25/0.5/0.75) leaves <= 0.5x the parameters;
    without the block removal the tiers would not."""
    import itertools

    from distillery.papers.hybrid_sd import pruning

    unet, total = pipe.unet, pruning.param_count(pipe.unet)
    names = [c.name for c in pruning.candidates(unet)]
    base = pruning.planned_params(unet, {})
    removed = {(n, r): base - pruning.planned_params(unet, {n: r}) for n in names for r in pruning.TIER_RATIOS}
    plans = [pruning.tiered_plan(dict(zip(names, map(float, ranks))))
             for ranks in itertools.permutations(range(len(names)))]
    worst = max(base - sum(removed[n, r] for n, r in plan.items()) for plan in plans)  # layers are independent
    assert worst <= 0.5 * total
    assert base < 0.65 * total  # the removed blocks alone are over a third of the UNet
    everything = [c.name for c in pruning.candidates(unet, remove_blocks=False)]
    tiers = {n: pruning.TIER_RATIOS[i % 3] for i, n in enumerate(everything)}
    assert pruning.planned_params(unet, tiers, remove_blocks=False) > 0.5 * total  # pruning alone falls short


def test_pruned_unet_loads_with_from_pretrained_in_a_fresh_process(small, tmp_path):
    small.save_pretrained(tmp_path / "unet")
    x, c = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 384)
    torch.save({"x": x, "c": c}, tmp_path / "inputs.pt")
    code = ("import torch; from distillery.papers.hybrid_sd.pruning import PrunedUNet2DConditionModel as M; "
            f"u = M.from_pretrained({str(tmp_path / 'unet')!r}).eval(); d = torch.load({str(tmp_path / 'inputs.pt')!r}, "
            "weights_only=True); torch.save(u(d['x'], 50, encoder_hidden_states=d['c']).sample.detach(), "
            f"{str(tmp_path / 'out.pt')!r})")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, timeout=300)
    with torch.no_grad():
        want = small(x, 50, encoder_hidden_states=c).sample
    # Equal to float rounding, not to the bit: on some CPUs (an AMD EPYC: 7e-7 on outputs near 0.85, at one thread
    # or two) the two processes' kernels round differently. A weight loaded wrongly moves the output by orders more.
    torch.testing.assert_close(torch.load(tmp_path / "out.pt", weights_only=True), want, rtol=0, atol=1e-5)


def test_a_unet_pruned_before_feed_forward_pruning_still_builds(pipe):
    """Releases saved before the feed-forward was pruned have no "ff" entry and keep their mid block."""
    from distillery.papers.hybrid_sd import pruning

    name = "down_blocks.0.attentions.0"
    config = {k: v for k, v in dict(pipe.unet.config).items() if not k.startswith("_")}
    old = pruning.PrunedUNet2DConditionModel(**config, pruned_layers={name: {"heads": [4, 4]}})
    block = dict(old.named_modules())[name]
    assert old.mid_block is not None and pruning._attentions(block)[0].heads == 4
    assert pruning._feed_forwards(block)[0].net[2].in_features == 256  # untouched


def test_uniform_plan_matches_the_parameter_count(pipe, small):
    from distillery.papers.hybrid_sd import pruning

    target = pruning.param_count(small)
    uniform = pruning.uniform_plan(pipe.unet, target)
    assert len(set(uniform.values())) == 1 and set(uniform) == {c.name for c in pruning.candidates(pipe.unet)}
    # As close as one ratio gets: a 16-channel group of a 128-channel up-path ResNet block is ~5% of the pruned UNet,
    # and every such block flips at the same ratio.
    assert abs(pruning.planned_params(pipe.unet, uniform) - target) / target < 0.08
    baseline = pruning.prune(pipe.unet, uniform)  # the same blocks removed, one ratio everywhere else
    assert baseline.mid_block is None and pruning.param_count(baseline) == pruning.planned_params(pipe.unet, uniform)


def test_tiers_follow_the_scores():
    from distillery.papers.hybrid_sd.pruning import tiered_plan

    plan = tiered_plan({f"l{i}": float(s) for i, s in enumerate([5, 1, 3, 0, 4, 2])})
    assert plan == {"l3": 0.25, "l1": 0.25, "l5": 0.5, "l2": 0.5, "l4": 0.75, "l0": 0.75}
    with pytest.raises(ValueError, match="no significance"):
        tiered_plan({})


def test_significance_scores_are_reproducible_for_a_seed(pipe):
    from distillery.papers.hybrid_sd import pruning

    names = [c.name for c in pruning.candidates(pipe.unet)]
    kw = dict(prompts=["a red emoji", "a blue emoji"], seeds=[1, 2], steps=2, guidance_scale=3.0)
    a = pruning.score_candidate(pipe, names[0], **kw)
    b = pruning.score_candidate(pipe, names[0], **kw)
    other = pruning.score_candidate(pipe, names[4], **kw)
    assert a["score"] == b["score"] > 0 and a["score"] != other["score"]
    assert a["params_removed"] > 0


def test_hybrid_sampler_k_equals_n_is_the_large_model_and_k_zero_the_small(pipe, small):
    from diffusers import StableDiffusionPipeline

    from distillery.papers.hybrid_sd import sampler

    prompts, seeds, n = ["a cat", "a dog"], [3, 4], 5
    gens = lambda: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    large_alone = pipe(prompts, num_inference_steps=n, guidance_scale=3.0, generator=gens(), output_type="latent").images
    small_pipe = StableDiffusionPipeline(**{**pipe.components, "unet": small})
    small_pipe.set_progress_bar_config(disable=True)
    small_alone = small_pipe(prompts, num_inference_steps=n, guidance_scale=3.0, generator=gens(),
                             output_type="latent").images
    run = lambda k: sampler.hybrid_latents(pipe, pipe.unet, small, prompts, seeds, steps=n, k=k,  # noqa: E731
                                           guidance_scale=3.0)
    assert torch.equal(run(n), large_alone)
    assert torch.equal(run(0), small_alone)
    mid = run(2)
    assert not torch.allclose(mid, large_alone) and not torch.allclose(mid, small_alone)
    # The handover carries the solver's history: continuing without it is another trajectory.
    latents, state = sampler.run_first(pipe, pipe.unet, prompts, seeds, steps=n, k=2, guidance_scale=3.0)
    assert state.model_outputs.shape[0] == 2 and state.lower_order_nums == 2
    assert torch.equal(sampler.run_rest(pipe, small, prompts, latents, state, steps=n, guidance_scale=3.0), mid)
    with pytest.raises(ValueError, match="solver holds 2"):
        sampler.run_rest(pipe, small, prompts, latents, sampler.SchedulerState(2, 2, None), steps=n, guidance_scale=3.0)
    with pytest.raises(ValueError, match="split k"):
        sampler.run_first(pipe, pipe.unet, prompts, seeds, steps=n, k=n + 1, guidance_scale=3.0)


def test_kd_and_tiny_vae_losses_train_and_log_every_term(pipe, small, tmp_path):
    from types import SimpleNamespace

    from diffusers import AutoencoderTiny

    from distillery.papers.hybrid_sd import distill

    pipe.save_pretrained(tmp_path / "teacher")
    rng = np.random.default_rng(0)
    ds = SimpleNamespace(images=rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8), captions=["a cat", "a dog"] * 4)
    logged = []
    student, metrics = distill.distill_unet(tmp_path / "teacher", copy.deepcopy(small), ds,
                                            distill.KDConfig(steps=2, batch_size=2), on_log=lambda m, s: logged.append(m),
                                            log_every=1)
    assert {"loss_denoise", "loss_out_kd", "loss_feat_kd"} <= set().union(*logged)
    assert "mid_block" not in distill.feature_blocks(small) and "mid_block" in distill.feature_blocks(pipe.unet)
    assert all(np.isfinite(v) for v in metrics.values())
    metrics = distill.train_tiny_vae(tmp_path / "teacher", ds, tmp_path / "vae",
                                     distill.TinyVAEConfig(steps=2, batch_size=2, channels=8),
                                     on_log=lambda m, s: logged.append(m), log_every=1)
    assert {"loss_enc_l1", "loss_rec_l1", "loss_g_adv", "loss_disc"} <= set().union(*logged)
    vae = AutoencoderTiny.from_pretrained(tmp_path / "vae")
    assert vae.decode(torch.zeros(1, 4, 8, 8)).sample.shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="degradation"):
        distill.TinyVAEConfig(degradation=1.5).check()


def test_edge_model_in_onnx_runtime_equals_pytorch(pipe, small, tmp_path):
    from diffusers import StableDiffusionPipeline

    from distillery.papers.hybrid_sd import distill, export

    edge = StableDiffusionPipeline(**{**pipe.components, "unet": small,
                                      "vae": distill.build_tiny_vae(pipe.vae, distill.TinyVAEConfig(channels=8))})
    paths = export.export_edge(edge, tmp_path)
    diff = export.compare_onnx(edge, paths)
    assert diff["unet_max_abs_diff"] <= 1e-4 * max(1.0, diff["unet_scale"])
    assert diff["decoder_max_abs_diff"] <= 1e-4
