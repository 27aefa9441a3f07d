"""MoDE's policy network: noise-conditioned routing, expert caching, the dense baseline, the EDM loss."""

from __future__ import annotations

import time

import pytest
import torch

from distillery.papers import mode

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = mode.MoDEConfig(obs_dim=12, act_dim=4, obs_history=2, chunk=6, text_dim=16, width=32, depth=3, heads=4,
                      num_experts=4, top_k=2, expert_hidden=48)


def _inputs(b: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, CFG.chunk, CFG.act_dim, generator=g), torch.randn(b, CFG.obs_history, CFG.obs_dim, generator=g),
            torch.randn(b, CFG.text_dim, generator=g))


def _routed(policy, fn):
    """Run fn() and return the expert indices every MoE layer chose."""
    seen, originals = [], []
    for block in policy.blocks:
        orig = block.ffn.route
        originals.append((block.ffn, orig))

        def spy(noise_emb, _orig=orig):
            out = _orig(noise_emb)
            seen.append(out[1].clone())
            return out
        block.ffn.route = spy
    try:
        fn()
    finally:
        for ffn, orig in originals:
            ffn.route = orig
    return seen


def test_routing_depends_on_the_noise_level_only():
    torch.manual_seed(0)
    policy = mode.MoDEPolicy(CFG).eval()
    sigma = torch.full((5,), 0.7)
    with torch.no_grad():
        first = _routed(policy, lambda: policy.denoise(*_inputs(5, 1)[:1], sigma, *_inputs(5, 1)[1:]))
        other = _routed(policy, lambda: policy.denoise(*_inputs(5, 2)[:1], sigma, *_inputs(5, 2)[1:]))
    assert len(first) == CFG.depth
    for a, b in zip(first, other):
        assert (a == a[0]).all(), "samples at the same noise level must share experts"
        assert torch.equal(a, b), "other observations, goals and actions must not change the experts"
    # Different noise levels are free to pick different experts (and across the schedule some do).
    sigmas = mode.karras_sigmas(10)
    cache = mode.ExpertCache(policy, sigmas)
    assert len({tuple(map(tuple, step)) for step in cache.experts(policy)}) > 1


def test_fused_experts_equal_the_mixture_at_that_noise_level():
    torch.manual_seed(1)
    moe = mode.NoiseRoutedMoE(32, 48, 4, 2)
    x, emb = torch.randn(3, 7, 32), torch.randn(1, 32)
    with torch.no_grad():
        want = moe(x, emb.expand(3, -1))
        got = moe.fuse(emb)(x)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_cached_policy_gives_the_same_actions_and_is_faster():
    torch.manual_seed(2)
    policy = mode.MoDEPolicy(CFG).eval()
    sigmas = mode.karras_sigmas(8)
    cache = mode.ExpertCache(policy, sigmas)
    noise, obs, goal = _inputs(4, 3)
    plain = mode.sample(policy, obs, goal, noise, sigmas)
    cached = mode.sample(policy, obs, goal, noise, sigmas, cache=cache)
    assert (plain - cached).abs().max().item() <= 1e-5
    assert torch.isfinite(plain).all()

    def clock(**kw):
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            mode.sample(policy, obs[:1], goal[:1], noise[:1], sigmas, **kw)
            best = min(best, time.perf_counter() - t)
        return best
    clock()
    assert clock(cache=cache) < clock()  # the benchmark measures the ratio; here only that caching helps at all

    with pytest.raises(ValueError, match="another sampling schedule"):
        mode.sample(policy, obs, goal, noise, mode.karras_sigmas(4), cache=cache)
    with pytest.raises(ValueError, match="dense baseline"):
        mode.ExpertCache(mode.MoDEPolicy(mode.MoDEConfig(**{**CFG.__dict__, "dense": True})), sigmas)


def test_frozen_sampler_gives_the_same_actions_for_any_batch():
    torch.manual_seed(5)
    policy = mode.MoDEPolicy(CFG).eval()
    sigmas = mode.karras_sigmas(6)
    cache = mode.ExpertCache(policy, sigmas)
    frozen = mode.freeze_sampler(policy, sigmas, cache)
    for b in (1, 4):
        noise, obs, goal = _inputs(b, 10 + b)
        want = mode.sample(policy, obs, goal, noise, sigmas)
        assert (frozen(obs, goal, noise) - want).abs().max().item() <= 1e-5
    dense = mode.MoDEPolicy(mode.MoDEConfig(**{**CFG.__dict__, "dense": True})).eval()
    noise, obs, goal = _inputs(3, 20)
    torch.testing.assert_close(mode.freeze_sampler(dense, sigmas)(obs, goal, noise),
                               mode.sample(dense, obs, goal, noise, sigmas), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="routes at run time"):
        mode.freeze_sampler(policy, sigmas)
    with pytest.raises(ValueError, match="another sampling schedule"):
        mode.freeze_sampler(policy, mode.karras_sigmas(4), cache)


def test_dense_baseline_has_the_same_active_size():
    moe, dense = mode.MoDEPolicy(CFG), mode.MoDEPolicy(mode.MoDEConfig(**{**CFG.__dict__, "dense": True}))
    routers = sum(p.numel() for b in moe.blocks for p in b.ffn.router.parameters())
    extra_biases = CFG.depth * (CFG.top_k - 1) * CFG.width  # each active expert keeps its own output bias
    dense_total = sum(p.numel() for p in dense.parameters())
    assert moe.active_parameters() - routers - extra_biases == dense.active_parameters() == dense_total
    assert sum(p.numel() for p in moe.parameters()) > moe.active_parameters()


def test_edm_training_fits_a_conditional_action_chunk():
    """A few hundred steps learn actions that depend on the observation; the load-balancing loss is finite."""
    torch.manual_seed(3)
    policy = mode.MoDEPolicy(CFG)
    opt = torch.optim.AdamW(policy.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(4)
    proj = torch.randn(CFG.obs_dim, CFG.act_dim, generator=g) * 0.3

    def batch(n):
        obs = torch.randn(n, CFG.obs_history, CFG.obs_dim, generator=g)
        goal = torch.zeros(n, CFG.text_dim)
        return (obs[:, -1] @ proj).tanh()[:, None].expand(n, CFG.chunk, CFG.act_dim), obs, goal

    for _ in range(300):
        actions, obs, goal = batch(64)
        loss, logs = mode.edm_loss(policy, actions, obs, goal, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert logs["balance_loss"] >= 1.0 - 1e-4  # Switch loss is >= 1, equal to 1 when perfectly balanced
    policy.eval()
    actions, obs, goal = batch(32)
    got = mode.sample(policy, obs, goal, torch.randn(actions.shape, generator=g), mode.karras_sigmas(10))
    err = (got - actions).abs().mean().item()
    assert err < 0.5 * actions.abs().mean().item(), err


def test_config_errors_are_explained():
    with pytest.raises(ValueError, match="top_k .* cannot exceed"):
        mode.MoDEConfig(num_experts=2, top_k=3).check()
    with pytest.raises(ValueError, match="divisible by heads"):
        mode.MoDEConfig(width=30, heads=4).check()


def test_a_step_that_idles_experts_still_gives_every_parameter_a_gradient():
    """Why MoDE trains under plain DDP (no find_unused_parameters): with one sample, top-2 of 4 experts run, yet
    every parameter gets a gradient (the idle experts' rows of their stacked weights are zero), so DDP's reducer
    is never left waiting."""
    torch.manual_seed(0)
    policy = mode.MoDEPolicy(CFG)
    actions, obs, goal = _inputs(1, 0)
    seen = _routed(policy, lambda: mode.edm_loss(policy, actions, obs, goal, generator=torch.Generator().manual_seed(0))[0]
                   .backward())
    assert all(len(set(idx.flatten().tolist())) == CFG.top_k for idx in seen), "some experts should sit idle"
    assert [n for n, p in policy.named_parameters() if p.grad is None] == []
    idle = sorted(set(range(CFG.num_experts)) - set(seen[0].flatten().tolist()))
    assert torch.count_nonzero(policy.blocks[0].ffn.w1.grad[idle]) == 0
