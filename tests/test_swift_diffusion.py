"""SwiftDiffusion add-ons on an untrained tiny SD (seconds): edge maps, LoRA styles, LoRA and ControlNet training
and their files as diffusers reads them."""

from __future__ import annotations

import copy
import itertools
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import numpy as np
import pytest
import torch

from distillery.models import tiny_sd
from distillery.papers.swift_diffusion import addons, train

CFG = tiny_sd.TinySDConfig(resolution=16, vae_channels=(8, 16, 16), vae_norm_groups=4, unet_channels=(16, 32),
                           norm_groups=8)

pytestmark = pytest.mark.usefixtures("one_thread")


def _squares() -> np.ndarray:
    images = np.concatenate([np.full((8, 16, 16, 3), 230, np.uint8), np.full((8, 16, 16, 3), 25, np.uint8)])
    images[:, 4:12, 4:12] = 120
    return images


@dataclass
class Squares:
    images: np.ndarray = field(default_factory=_squares)
    captions: list = field(default_factory=lambda: ["a bright square"] * 8 + ["a dark square"] * 8)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    tiny_sd.build_pipeline(CFG, seed=0).save_pretrained(out)
    return out


def test_edge_map_outlines_the_square_and_nothing_else():
    edges = addons.edge_map(_squares()[:1])[0, :, :, 0]
    assert edges.dtype == np.uint8 and set(np.unique(edges)) == {0, 255}
    ring = np.zeros((16, 16), bool)
    ring[3:13, 3:13] = True
    ring[5:11, 5:11] = False  # the Sobel kernel marks both sides of the square's border
    assert np.array_equal(edges == 255, ring)
    assert not addons.edge_map(np.full((1, 16, 16, 3), 77, np.uint8)).any()  # a flat image has no edges
    with pytest.raises(ValueError, match="uint8"):
        addons.edge_map(np.zeros((1, 16, 16), np.uint8))


def test_styles_are_visibly_different_transformations():
    images = _squares()
    styled = {s: addons.stylize(images, s).astype(float) for s in addons.STYLES}
    assert len(styled) >= 3
    for a in styled:
        assert styled[a].shape == images.shape and np.abs(styled[a] - images).mean() > 10, a
        for b in styled:
            if a < b:
                assert np.abs(styled[a] - styled[b]).mean() > 10, (a, b)
    assert np.array_equal(styled["inverted"], 255.0 - images)
    tint = styled["tint"]
    assert (tint[..., 0] >= tint[..., 1]).all() and (tint[..., 1] >= tint[..., 2]).all()  # red over green over blue
    with pytest.raises(ValueError, match="unknown LoRA style 'sepia'"):
        addons.stylize(images, "sepia")


def test_configs_report_every_problem_at_once():
    with pytest.raises(ValueError, match="steps must be >= 1.*lr must be in.*style must be one of.*rank must be"):
        train.LoRATrainConfig(steps=0, lr=2.0, style="sepia", rank=0).check()
    assert train.conditioning_channels(4) == (16, 32, 64)  # two halvings: 16 px image -> 4 px latents


def test_trained_lora_file_is_what_diffusers_fuses_and_what_we_patch(base_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    cfg = train.LoRATrainConfig(steps=4, batch_size=4, lr=1e-2, style="inverted", rank=2, alpha=4.0)
    metrics = train.train_lora(Squares(), base_dir, tmp_path / "lora", cfg)
    assert np.isfinite(metrics["lora_final_loss"]) and metrics["lora_parameters"] > 0
    path = tmp_path / "lora" / addons.LORA_FILE
    lora = addons.read_lora(path, "inverted")
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")  # safetensors: length, JSON header, tensor bytes
    assert lora.scaling == 2.0 and lora.nbytes == path.stat().st_size - header
    kinds = {type(m).__name__ for n, m in StableDiffusionPipeline.from_pretrained(base_dir).unet.named_modules()
             if n in lora.layers}
    assert kinds == {"Linear", "Conv2d"}

    pipe = StableDiffusionPipeline.from_pretrained(base_dir)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(tmp_path / "lora")
    pipe.fuse_lora(lora_scale=0.7)
    pipe.unload_lora_weights()  # keeps the fused weights
    fused = pipe.unet.state_dict()
    for module in lora.layers:
        w = before[f"{module}.weight"]
        torch.testing.assert_close(fused[f"{module}.weight"], w + 0.7 * lora.delta(module, w.shape),
                                   rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(fused[f"{m}.weight"], before[f"{m}.weight"]) for m in lora.layers)


def test_trained_controlnet_loads_and_steers_the_frozen_unet(base_dir, tmp_path):
    from diffusers import ControlNetModel, UNet2DConditionModel

    metrics = train.train_controlnet(Squares(), base_dir, tmp_path / "cn",
                                     train.ControlNetTrainConfig(steps=4, batch_size=4, lr=1e-2))
    assert np.isfinite(metrics["controlnet_final_loss"])
    assert sorted(p.name for p in (tmp_path / "cn").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    cn = ControlNetModel.from_pretrained(tmp_path / "cn", use_safetensors=True).eval()
    unet = UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet").eval()
    z, t, text = torch.randn(2, 4, 4, 4), torch.tensor([500, 500]), torch.randn(2, 8, 384)
    hint = torch.from_numpy(addons.edge_map(_squares()[:2])).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        down, mid = cn(z, t, encoder_hidden_states=text, controlnet_cond=hint, return_dict=False)
        plain = unet(z, t, encoder_hidden_states=text).sample
        steered = unet(z, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                       mid_block_additional_residual=mid).sample
    assert len(down) == 1 + 2 * len(unet.down_blocks) - 1  # conv_in + each block's layers and downsamplers
    assert (steered - plain).abs().max() > 1e-4  # the zero convolutions moved off zero


def test_training_refuses_a_dataset_of_the_wrong_size(base_dir, tmp_path):
    bad = Squares(images=np.zeros((4, 32, 32, 3), np.uint8), captions=["x"] * 4)
    with pytest.raises(ValueError, match=r"\(N, 16, 16, 3\)"):
        train.train_lora(bad, base_dir, tmp_path / "x", train.LoRATrainConfig(steps=1))


# ------------------------------------------------------------------------------------------------ runtime


def _random_lora(unet, seed: int, rank: int = 2) -> dict:
    """A LoRA file's tensors (peft key names) for the attention projections and ResNet convolutions, random
    enough to change the image."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in unet.named_modules():
        if name.endswith(("to_q", "to_v", "to_out.0", "conv1")) and hasattr(m, "weight"):
            w = m.weight
            a_shape = (rank, *w.shape[1:]) if w.ndim == 2 else (rank, w.shape[1], *w.shape[2:])
            b_shape = (w.shape[0], rank) if w.ndim == 2 else (w.shape[0], rank, 1, 1)
            sd[f"unet.{name}.lora_A.weight"] = torch.randn(a_shape, generator=gen) * 0.3
            sd[f"unet.{name}.lora_B.weight"] = torch.randn(b_shape, generator=gen) * 0.3
    return sd


class Source:
    """An add-on source for the cache: LoRA files written with safetensors, ControlNets in memory; each load can be
    held back until `release` is set, and loads are counted."""

    def __init__(self, root, pipe):
        from diffusers import ControlNetModel
        from safetensors.torch import save_file

        self.root, self.loads, self.release, self.delay_s = root, [], None, 0.0
        for i, name in enumerate(("ink", "bold", "warm")):
            save_file(_random_lora(pipe.unet, i), str(root / f"{name}.safetensors"), metadata={"format": "pt"})
        torch.manual_seed(0)
        cn = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=train.conditioning_channels(4))
        with torch.no_grad():  # from_unet zero-initializes the output convolutions: make them matter
            for p in [*cn.controlnet_down_blocks.parameters(), *cn.controlnet_mid_block.parameters()]:
                p.normal_(0, 0.2)
        self.controlnet = cn.eval()

    def __call__(self, kind: str, name: str):
        self.loads.append((kind, name))
        time.sleep(self.delay_s)
        if self.release is not None:
            assert self.release.wait(30)
        if kind == "controlnet":
            return self.controlnet
        return addons.read_lora(self.root / f"{name}.safetensors", name)


@pytest.fixture(scope="module")
def pipe():
    p = tiny_sd.build_pipeline(CFG, seed=0)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture
def source(pipe, tmp_path):
    return Source(tmp_path, pipe)


def _runtime(pipe, source, budget=1 << 30, **kw):
    from distillery.papers.swift_diffusion import runtime

    return runtime.SwiftRuntime(pipe, runtime.AddonCache(source, budget), **kw)


def _gen(steps=4, **kw):
    from distillery.papers.swift_diffusion.runtime import Generation

    return Generation(prompts=["a bright square", "a dark square"], seeds=[3, 4], steps=steps, guidance=2.0, **kw)


def _control():
    return torch.from_numpy(addons.edge_map(_squares()[[0, 9]])).permute(0, 3, 1, 2).float() / 255


def test_cache_evicts_least_recently_used_under_its_byte_budget():
    from types import SimpleNamespace

    from distillery.papers.swift_diffusion.runtime import AddonCache

    loads = []

    def load(kind, name):
        loads.append(name)
        if name == "broken":
            raise OSError("unreachable")
        return SimpleNamespace(nbytes=400 if name == "huge" else 100, name=name)

    cache = AddonCache(load, budget_bytes=250)
    assert [cache.get("lora", n)[1] for n in ("a", "b", "a")] == [False, False, True]
    cache.get("lora", "c")  # 300 bytes > 250: b, the least recently used, goes
    assert cache.keys() == [("lora", "a"), ("lora", "c")] and cache.nbytes == 200 and cache.evictions == 1
    assert cache.get("lora", "huge")[0].name == "huge" and ("lora", "huge") not in cache.keys()  # served, not kept
    with pytest.raises(OSError, match="unreachable"):
        cache.get("lora", "broken")
    with pytest.raises(OSError):
        cache.get("lora", "broken")  # a failed load is not cached: tried again
    assert loads.count("broken") == 2 and loads.count("a") == 1
    assert (cache.hits, cache.misses) == (1, 6)


def test_concurrent_misses_share_one_load(pipe, source):
    from distillery.papers.swift_diffusion.runtime import AddonCache

    source.release = threading.Event()
    cache = AddonCache(source, 1 << 30)
    (f1, hit1), (f2, hit2) = cache.fetch("lora", "ink"), cache.fetch("lora", "ink")
    assert f1 is f2 and not hit1 and not hit2 and not f1.done()
    source.release.set()
    assert f1.result(10).name == "ink" and source.loads == [("lora", "ink")]


def test_late_patch_with_k_zero_equals_from_step_zero_and_diffusers_fuse(pipe, source):
    rt = _runtime(pipe, source, wait_fraction=0.0)
    g = _gen(loras=[("ink", 0.8), ("bold", 0.5)])
    source.delay_s = 0.2  # a slow fetch: with K = 0 the request waits for it before step 0
    cold, report = rt.generate(g, output_type="np")
    assert [(e["cache"], e["applied_from_step"]) for e in report["loras"]] == [("miss", 0), ("miss", 0)]
    warm, report = rt.generate(g, output_type="np")
    assert [(e["cache"], e["applied_from_step"]) for e in report["loras"]] == [("hit", 0), ("hit", 0)]
    np.testing.assert_allclose(cold, warm, atol=1e-5)  # the fused patch, after the wait (cold) or at once
    base, _ = rt.generate(_gen(), output_type="np")
    assert np.abs(cold - base).mean() > 0.01  # the LoRAs change the image
    reference, report = _runtime(pipe, source, baseline=True).generate(g, output_type="np")
    np.testing.assert_allclose(cold, reference, atol=2e-3)  # diffusers' load_lora_weights + fuse_lora


def test_a_fused_patch_equals_the_products_added_and_restores_exactly(pipe, source):
    from distillery.papers.swift_diffusion.runtime import LoRAPatcher

    lora, patcher = source("lora", "ink"), LoRAPatcher(pipe.unet)
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    patcher.apply(lora, 0.7)
    fused = pipe.unet.state_dict()
    for name in lora.layers:
        w = base[f"{name}.weight"]
        torch.testing.assert_close(fused[f"{name}.weight"], w + 0.7 * lora.delta(name, w.shape), atol=1e-6, rtol=0)
    assert sum(not torch.equal(fused[k], base[k]) for k in base) == len(lora.layers)  # every layer, only those
    patcher.restore()
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in base.items())


def test_a_lora_that_lands_mid_request_is_patched_at_the_next_step_boundary_by_step_k(pipe, source):
    rt = _runtime(pipe, source, wait_fraction=0.67)  # K = 4 of 6
    source.release = threading.Event()
    calls = []

    def count(module, args):  # the fetch lands while the UNet runs step 1
        calls.append(1)
        if len(calls) == 2:
            source.release.set()

    hook = pipe.unet.register_forward_pre_hook(count)
    try:
        late, report = rt.generate(_gen(steps=6, loras=[("warm", 1.0)]), output_type="np")
    finally:
        hook.remove()
    (entry,) = report["loras"]
    assert report["wait_step"] == 4 and entry["cache"] == "miss" and 2 <= entry["applied_from_step"] <= 4
    early, report = rt.generate(_gen(steps=6, loras=[("warm", 1.0)]), output_type="np")
    assert report["loras"][0] == {"name": "warm", "scale": 1.0, "cache": "hit", "applied_from_step": 0}
    base, _ = rt.generate(_gen(steps=6), output_type="np")
    assert 0 < np.abs(late - early).mean() < np.abs(base - early).mean()  # a late LoRA is between base and full


def test_base_weights_are_restored_bit_for_bit_after_many_mixed_requests(pipe, source):
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    one = addons.read_lora(source.root / "ink.safetensors").nbytes
    rt = _runtime(pipe, source, budget=int(1.5 * one), wait_fraction=0.5)  # room for one LoRA: misses, evictions
    mixes = [[("ink", 1.0)], [("ink", 0.3), ("bold", 2.0)], [], [("warm", -1.0)], [("bold", 1.0), ("warm", 0.7)],
             [("ink", 1.5)]]
    for i, loras in enumerate(mixes):
        source.release = threading.Event() if i % 2 else None  # every other request lands late
        if source.release is not None:
            threading.Timer(0.05, source.release.set).start()
        cn = dict(controlnet="edges", control_image=_control()) if i % 3 == 0 else {}
        rt.generate(_gen(steps=3, loras=loras, **cn), output_type="np")
        after = pipe.unet.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items()), f"weights changed after request {i}"
    assert rt.cache.evictions > 0


def test_controlnet_in_parallel_equals_sequential_and_diffusers(pipe, source):
    g = _gen(steps=3, controlnet="edges", control_image=_control(), controlnet_scale=0.9)
    net = source.controlnet.controlnet_cond_embedding
    embedded = []
    hook = net.register_forward_hook(lambda *a: embedded.append(1))
    parallel, report = _runtime(pipe, source, parallel_controlnet=True).generate(g, output_type="np")
    hook.remove()
    assert len(embedded) == 1 and source.controlnet.controlnet_cond_embedding is net  # once a request, not a step
    assert report["controlnet"] == {"name": "edges", "cache": "miss", "parallel": True, "process": False,
                                   "conditional_half_only": False, "compiled": False, "unet_calls": 3}
    sequential, report = _runtime(pipe, source, parallel_controlnet=False).generate(g, output_type="np")
    assert report["controlnet"]["parallel"] is False
    np.testing.assert_allclose(parallel, sequential, atol=1e-6)
    reference, _ = _runtime(pipe, source, baseline=True).generate(g, output_type="np")
    np.testing.assert_allclose(parallel, reference, atol=1e-5)  # StableDiffusionControlNetPipeline
    plain, _ = _runtime(pipe, source).generate(_gen(steps=3), output_type="np")
    assert np.abs(parallel - plain).mean() > 0.01  # the ControlNet steers the image


def test_controlnet_process_equals_sequential_survives_its_worker_and_restores_weights(pipe, source, monkeypatch):
    """ControlNet-as-a-service in its own process: the same image as in-process, with or without the guidance
    split; a ControlNet is copied to the worker once; a worker killed between requests is started again, one
    killed mid-request fails that request only, with the base weights restored."""
    g = _gen(steps=3, controlnet="edges", control_image=_control(), controlnet_scale=0.9, loras=[("ink", 0.7)])
    sequential, _ = _runtime(pipe, source, parallel_controlnet=False, wait_fraction=0.0).generate(g, output_type="np")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    rt = _runtime(pipe, source, controlnet_process=True, wait_fraction=0.0)
    try:
        image, report = rt.generate(g, output_type="np")
        assert report["controlnet"]["process"] is True and report["controlnet"]["unet_calls"] == 3
        assert rt.unet_threads(g) == max(1, rt.cores - 1)
        np.testing.assert_allclose(image, sequential, atol=1e-5)
        again, report = rt.generate(g, output_type="np")
        np.testing.assert_allclose(again, image, atol=0)
        assert len(rt.executor._sent) == 1  # the weights crossed once
        split_rt = _runtime(pipe, source, controlnet_process=True, guidance_split=True, wait_fraction=0.0)
        try:
            split, report = split_rt.generate(g, output_type="np")
            assert report["guidance_split"] is True and report["controlnet"]["conditional_half_only"] is True
            in_process, _ = _runtime(pipe, source, guidance_split=True, wait_fraction=0.0).generate(g, output_type="np")
            np.testing.assert_allclose(split, in_process, atol=1e-5)
        finally:
            split_rt.close()
        service, submit = rt.executor, rt.executor.submit
        service._proc.kill()  # between requests: the next one starts a new worker
        service._proc.join()
        restarted, _ = rt.generate(g, output_type="np")
        np.testing.assert_allclose(restarted, image, atol=0)

        def dies_at_second_step(*args):
            if service.submitted == 1:
                service._proc.kill()
                service._proc.join()
            service.submitted += 1
            return submit(*args)

        service.submitted = 0
        monkeypatch.setattr(service, "submit", dies_at_second_step)
        with pytest.raises(RuntimeError, match="ControlNet worker process stopped"):
            rt.generate(g, output_type="np")
        assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in before.items())  # restored after it
        monkeypatch.undo()
        np.testing.assert_allclose(rt.generate(g, output_type="np")[0], image, atol=0)
    finally:
        rt.close()


def test_controlnet_process_answers_a_broken_controlnet_with_an_error_and_keeps_serving(pipe, source):
    from distillery.papers.swift_diffusion.runtime import ControlNetHooks, ControlNetProcess

    service = ControlNetProcess()
    unet, image = pipe.unet, _control()
    sample, text = torch.randn(2, 4, 4, 4), torch.randn(2, 77, unet.config.cross_attention_dim)
    try:
        wrong = copy.deepcopy(source.controlnet)
        wrong.register_buffer("surprise", torch.zeros(1))  # a state the worker's fresh model cannot load
        with torch.no_grad(), ControlNetHooks(unet, wrong, image, 1.0, service):
            with pytest.raises(RuntimeError, match="load: RuntimeError"):
                unet(sample, 10, encoder_hidden_states=text)
        with torch.no_grad():
            with ControlNetHooks(unet, source.controlnet, image, 1.0, service):
                served = unet(sample, 10, encoder_hidden_states=text).sample
            with ControlNetHooks(unet, source.controlnet, image, 1.0):
                here = unet(sample, 10, encoder_hidden_states=text).sample
        torch.testing.assert_close(served, here, atol=1e-5, rtol=0)
    finally:
        service.close()


def test_guidance_split_equals_one_batched_call_and_needs_guidance(pipe, source):
    g = _gen(steps=3, loras=[("ink", 0.7)])  # K = 0: the LoRA from step 0 in both, whenever its fetch lands
    split, report = _runtime(pipe, source, guidance_split=True, wait_fraction=0.0).generate(g, output_type="np")
    assert report["guidance_split"] is True and report["loras"][0]["applied_from_step"] == 0
    batched, report = _runtime(pipe, source, wait_fraction=0.0).generate(g, output_type="np")
    assert report["guidance_split"] is False and report["loras"][0]["applied_from_step"] == 0
    np.testing.assert_allclose(split, batched, atol=1e-4)  # batch 1 vs 2 may take other kernels: rounding only
    _, report = _runtime(pipe, source, guidance_split=True).generate(replace(g, guidance=1.0), output_type="np")
    assert report["guidance_split"] is False  # one half only: nothing to split
    assert "forward" not in vars(pipe.unet)  # the UNet's own forward again


def test_controlnet_on_the_conditional_half_steers_those_rows_only(pipe, source):
    """One UNet call on [unconditional; conditional], the ControlNet on the conditional half only (in the calling
    thread, a thread, its process; with and without the split): the unconditional rows are the plain UNet's, the
    conditional rows those of the UNet with the ControlNet's residuals, as one sequential call gives them."""
    from distillery.papers.swift_diffusion.runtime import ControlNetHooks, ControlNetProcess, GuidanceSplit, worker

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 4, 4, generator=gen)
    text = torch.randn(4, 8, pipe.unet.config.cross_attention_dim, generator=gen)
    t, image, unet = torch.tensor(500), _control(), pipe.unet
    with torch.inference_mode():
        plain = unet(x[:2], t, encoder_hidden_states=text[:2], return_dict=False)[0]
        with ControlNetHooks(unet, source.controlnet, image, 0.9):
            steered = unet(x[2:], t, encoder_hidden_states=text[2:], return_dict=False)[0]
        service = ControlNetProcess()
        try:
            for cn_worker, split_on in itertools.product((None, worker("controlnet"), service), (True, False)):
                with GuidanceSplit(unet, worker("unconditional")) if split_on else nullcontext() as split, \
                        ControlNetHooks(unet, source.controlnet, image, 0.9, cn_worker, cond_only=True) as hooks:
                    both = unet(x, t, encoder_hidden_states=text).sample
                assert hooks.calls == 1 and (split is None or split.calls == 1)
                torch.testing.assert_close(both[:2], plain, atol=1e-4, rtol=0)
                torch.testing.assert_close(both[2:], steered, atol=1e-4, rtol=0)
            with ControlNetHooks(unet, source.controlnet, image, 0.9, cond_only=True, native=True) as hooks:
                both = unet(x, t, encoder_hidden_states=text).sample  # residuals passed in, zeros for the first half
            assert hooks.calls == 1
            torch.testing.assert_close(both, torch.cat([plain, steered]), atol=1e-4, rtol=0)
        finally:
            service.close()
    assert (steered - plain).abs().mean() > 1e-3  # the ControlNet does move the conditional half


def test_runtime_steers_the_conditional_half_only_without_the_split(pipe, source):
    g = _gen(steps=3, controlnet="edges", control_image=_control(), controlnet_scale=0.9)
    rt = _runtime(pipe, source, controlnet_cond_only=True, controlnet_process=True)
    try:
        image, report = rt.generate(g, output_type="np")
        assert report["guidance_split"] is False and report["controlnet"]["conditional_half_only"] is True
        split, _ = _runtime(pipe, source, guidance_split=True).generate(g, output_type="np")
        np.testing.assert_allclose(image, split, atol=1e-4)  # the split's conditional-half ControlNet, in one call
        _, report = rt.generate(replace(g, guidance=1.0), output_type="np")
        assert report["controlnet"]["conditional_half_only"] is False  # no unconditional half without guidance
    finally:
        rt.close()


@pytest.mark.slow
def test_the_compiled_backbone_gives_the_eager_images_sees_each_patch_and_restores_the_weights(pipe, source):
    """compile_backbone: the UNet and the ControlNet compiled, the ControlNet's residuals handed to the UNet's call
    (conditional half; zeros for the other). The eager runtime's images with a LoRA landing at step 2 (patched in
    place between two compiled calls), a resident LoRA and none (the restore is seen too); base weights bit-equal."""
    from distillery.papers.swift_diffusion.evaluate import LandsAt

    compiled_pipe = tiny_sd.build_pipeline(CFG, seed=0)  # its own: compiling replaces the UNet's forward for good
    compiled_pipe.set_progress_bar_config(disable=True)
    before = {k: v.clone() for k, v in compiled_pipe.unet.state_dict().items()}
    eager = _runtime(pipe, source, wait_fraction=0.5, controlnet_cond_only=True)
    compiled = _runtime(compiled_pipe, source, wait_fraction=0.5, controlnet_cond_only=True, compile_backbone=True)
    late = _gen(steps=4, loras=[("ink", 0.8)])
    for rt, unet in ((eager, pipe.unet), (compiled, compiled_pipe.unet)):
        real, rt.cache = rt.cache, LandsAt(rt.cache, unet, 2)
        try:
            rt.late, rt.late_report = rt.generate(late, output_type="np")
        finally:
            rt.cache.close()
            rt.cache = real
    assert compiled.late_report["loras"][0]["applied_from_step"] == 2
    np.testing.assert_allclose(compiled.late, eager.late, atol=1e-4)
    g = _gen(steps=4, loras=[("ink", 0.8)], controlnet="edges", control_image=_control(), controlnet_scale=0.9)
    for rt in (eager, compiled):
        rt.cache.get("lora", "ink")  # resident now: patched before step 0 with the fused addmm
    for request in (g, _gen(steps=4)):  # then no add-on: the restored weights are what the compiled graph reads
        ours, report = compiled.generate(request, output_type="np")
        want, _ = eager.generate(request, output_type="np")
        np.testing.assert_allclose(ours, want, atol=1e-4)
        assert [e["cache"] for e in report["loras"]] == ["hit"] * len(request.loras)
        if request.controlnet:
            assert {k: report["controlnet"][k] for k in ("compiled", "parallel", "conditional_half_only")} == \
                {"compiled": True, "parallel": False, "conditional_half_only": True}
        assert all(torch.equal(compiled_pipe.unet.state_dict()[k], v) for k, v in before.items())
    for bad in (dict(baseline=True), dict(guidance_split=True)):
        with pytest.raises(ValueError, match="compile_backbone"):
            _runtime(pipe, source, compile_backbone=True, **bad)


def test_split_with_controlnet_and_late_loras_restores_the_base_weights(pipe, source):
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    rt = _runtime(pipe, source, guidance_split=True, wait_fraction=0.5)
    source.delay_s = 0.05
    full, _ = _runtime(pipe, source).generate(_gen(steps=3, controlnet="edges", control_image=_control()),
                                              output_type="np")
    images, report = rt.generate(_gen(steps=3, loras=[("bold", 1.0)], controlnet="edges", control_image=_control()),
                                 output_type="np")
    assert report["controlnet"]["conditional_half_only"] is True and report["controlnet"]["unet_calls"] == 3
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in before.items())
    cond_only, _ = rt.generate(_gen(steps=3, controlnet="edges", control_image=_control()), output_type="np")
    plain, _ = rt.generate(_gen(steps=3), output_type="np")
    assert 0 < np.abs(cond_only - full).mean() < np.abs(plain - full).mean()  # steered, not quite as with both


def test_a_call_takes_the_cores_its_other_threads_leave_and_gives_them_back(pipe, source):

    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, a: seen.append(torch.get_num_threads()))
    threads = torch.get_num_threads()
    try:
        for rt in (_runtime(pipe, source), _runtime(pipe, source, guidance_split=True),
                   _runtime(pipe, source, baseline=True)):
            rt.cores = 4  # a 4-core pod: the counts differ for every kind of call
            g = _gen(steps=1, controlnet="edges", control_image=_control())
            plan = [rt.unet_threads(x) for x in (_gen(steps=1), g, replace(g, guidance=1.0))]
            seen.clear()
            rt.generate(g, output_type="np")
            assert seen == [plan[1]] and torch.get_num_threads() == threads
            if rt.baseline:
                assert plan == [4, 4, 4]  # one thread of work: every core, as plain diffusers
            elif rt.guidance_worker is None:
                assert plan == [4, 3, 3]  # the concurrent ControlNet holds one
            else:
                assert plan == [3, 2, 3]  # and the unconditional half one more, under guidance only
    finally:
        hook.remove()
        torch.set_num_threads(threads)


def test_ssim_is_one_for_equal_images_and_falls_with_noise():
    from distillery.papers.swift_diffusion.evaluate import ssim

    rng = np.random.default_rng(0)
    x = _squares()[:2].astype(float) / 255
    noisy = [np.clip(x + rng.normal(0, s, x.shape), 0, 1) for s in (0.02, 0.1, 0.3)]
    scores = [ssim(x, n).mean() for n in noisy]
    np.testing.assert_allclose(ssim(x, x), 1.0)
    assert 1 > scores[0] > scores[1] > scores[2]
    assert ssim(x, 1 - x).mean() < 0.5  # inverted structure


def test_lands_at_patches_the_lora_at_exactly_step_k(pipe, source):
    from distillery.papers.swift_diffusion.evaluate import LandsAt

    rt = _runtime(pipe, source)
    real = rt.cache
    for k in (0, 1, 3):
        rt.wait_fraction, rt.cache = k / 5, LandsAt(real, pipe.unet, k)
        try:
            _, report = rt.generate(_gen(steps=5, loras=[("ink", 1.0)]), output_type="np")
        finally:
            rt.cache.close()
        assert report["loras"][0]["applied_from_step"] == k


def test_a_store_that_hangs_fails_the_request_at_the_wait_step_and_restores_the_weights(pipe, source):
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    rt = _runtime(pipe, source, wait_fraction=0.5, fetch_timeout_s=0.2)
    rt.cache.get("lora", "ink")  # resident: patched before step 0
    source.release = threading.Event()  # the next fetch hangs until the test ends
    with pytest.raises(TimeoutError, match="LoRA 'bold' was not fetched within 0.2 s"):
        rt.generate(_gen(steps=4, loras=[("ink", 1.0), ("bold", 1.0)]), output_type="np")
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in before.items())
    source.release.set()


@pytest.mark.slow
def test_a_trained_lora_shows_its_style_through_the_runtime(tmp_path):
    """A base trained on bright and dark squares, and the `inverted` LoRA trained on it (about 20 s): through the
    runtime the LoRA turns bright squares dark and dark ones bright."""
    from diffusers import StableDiffusionPipeline

    from distillery.papers.swift_diffusion import runtime

    data = Squares(images=np.concatenate([_squares(), _squares()]), captions=Squares().captions * 2)
    tiny_sd.train_vae(data, tmp_path / "vae", cfg=CFG, steps=80, batch_size=16)
    tiny_sd.train_unet(data, tmp_path / "vae", tmp_path / "base", cfg=CFG, steps=150, batch_size=16, lr=2e-3)
    train.train_lora(data, tmp_path / "base", tmp_path / "inverted",
                     train.LoRATrainConfig(steps=80, batch_size=16, lr=5e-3, style="inverted"))
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "base")
    pipe.set_progress_bar_config(disable=True)
    cache = runtime.AddonCache(lambda kind, name: addons.read_lora(tmp_path / name / addons.LORA_FILE, name), 1 << 30)
    rt = runtime.SwiftRuntime(pipe, cache, wait_fraction=0.0)
    g = runtime.Generation(["a dark square"] * 4 + ["a bright square"] * 4, list(range(8)), 10, 3.0)
    base, _ = rt.generate(g, output_type="np")
    g.loras = [("inverted", 1.0)]
    styled, _ = rt.generate(g, output_type="np")
    assert base[4:].mean() - base[:4].mean() > 0.15  # the base tells the prompts apart
    assert styled[:4].mean() > base[:4].mean() + 0.15 and styled[4:].mean() < base[4:].mean() - 0.25
