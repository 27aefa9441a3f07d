"""SwiftDiffusion targets, measured in one run in one process with the predictor's own runtime (the swift-diffusion
kind and its swift-diffusion-baseline twin built on the same model folder and add-on store):

1. one ControlNet (resident) + one cold LoRA: latency of ours vs plain diffusers (load_lora_weights + fuse_lora per
   request, ControlNet before the UNet, unfuse + unload), with the store as it is and with a slower store
   (`--fetch-delay-ms` added to every add-on fetch); ours eager (the predictor's default) and with the compiled
   backbone (`compile_backbone`, a predictor of its own; its load, compile and warm-up included, is reported);
2. add-on overhead vs a no-add-on request: a cold LoRA whose fetch fits within K steps, a resident LoRA, the
   ControlNet run concurrently with the UNet (on the conditional half, the default, and on both halves; in its
   worker process, and on a thread) and sequentially, and the
   machine's own parallel headroom (two one-thread matmul loops at once vs one after the other: the cap of the
   concurrent ControlNet's gain); and the compiled backbone against eager, with and without add-ons;
3. quality of late patching: SSIM against the from-step-0 image when the LoRA lands at K/N in {0, 0.1, 0.2, 0.4},
   with the no-LoRA image as the floor; and of the ControlNet on the conditional half only (the default, and the
   guidance split's), against the ControlNet on both halves (the no-ControlNet image as the floor).

The guidance split (guidance's two halves on two threads) is measured beside the default runtime in 1 and 2.

    python bench/swift_diffusion.py [--base PIPELINE_DIR] [--addons STORE] [--steps 20] [--trials 5]

Without --base an untrained tiny SD (32 px) is the base and the add-ons are random (a rank-4 LoRA on every
attention, feed-forward and ResNet convolution layer; a ControlNet from the UNet with non-zero output
convolutions): latencies are what they are, SSIM then only checks the mechanism. --addons: a store with
lora/NAME/ and controlnet/NAME/ folders (the first of each is used).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from _common import RESULTS, report


def _untrained_store(pipe, store: Path) -> None:
    from diffusers import ControlNetModel
    from safetensors.torch import save_file

    from distillery.papers.swift_diffusion.addons import LORA_FILE
    from distillery.papers.swift_diffusion.train import LORA_TARGETS, conditioning_channels

    gen = torch.Generator().manual_seed(0)
    sd = {}
    for name, m in pipe.unet.named_modules():
        if name.endswith(LORA_TARGETS) and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            w = m.weight
            sd[f"unet.{name}.lora_A.weight"] = torch.randn((4, *w.shape[1:]), generator=gen) * 0.2
            sd[f"unet.{name}.lora_B.weight"] = torch.randn((w.shape[0], 4, *([1, 1] if w.ndim == 4 else [])),
                                                           generator=gen) * 0.2
    (store / "lora" / "style").mkdir(parents=True)
    save_file(sd, str(store / "lora" / "style" / LORA_FILE), metadata={"format": "pt"})
    cn = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=conditioning_channels(
        pipe.vae_scale_factor))
    with torch.no_grad():
        for p in [*cn.controlnet_down_blocks.parameters(), *cn.controlnet_mid_block.parameters()]:
            p.normal_(0, 0.05, generator=gen)
    cn.save_pretrained(store / "controlnet" / "edges", safe_serialization=True)


def _model_folder(opts, work: Path) -> Path:
    from distillery.models import tiny_sd

    model = work / "model"
    if opts.base:
        shutil.copytree(opts.base, model)
    else:
        tiny_sd.build_pipeline(tiny_sd.TinySDConfig(), seed=0).save_pretrained(model)
    store = Path(opts.addons) if opts.addons else model / "addons"
    if not opts.addons:
        from diffusers import StableDiffusionPipeline

        _untrained_store(StableDiffusionPipeline.from_pretrained(model), store)
    cfg = model / "distillery.json"
    given = json.loads(cfg.read_text()) if cfg.exists() else {}
    cfg.write_text(json.dumps({**given, "kind": "swift-diffusion", "max_steps": max(opts.steps, 100),
                               "addons_uri": str(store.resolve()), "wait_fraction": opts.wait_fraction}))
    return model


def _predictor(kind, model: Path, delay_s: float, **limits):
    m = kind("bench", model)
    m.check()
    m.addon_limits.update(limits)
    t = time.perf_counter()
    m.load_model()
    m.load_s = time.perf_counter() - t
    m.pipe.set_progress_bar_config(disable=True)
    m.fresh_cache = _caches(m, delay_s)
    return m


def _caches(m, delay_s: float):
    """A maker of empty add-on caches for predictor `m` whose store answers `delay_s` later."""
    from distillery.papers.swift_diffusion.runtime import AddonCache

    def slow_load(k, name):  # a store farther away: the same files, later
        time.sleep(delay_s)
        return m._load_addon(k, name)

    return lambda: AddonCache(slow_load, m.addon_limits["addon_cache_bytes"])


def _control_image(m) -> torch.Tensor:
    """The edge map of a white disc: a ControlNet condition of the model's size."""
    from distillery.papers.swift_diffusion.addons import edge_map

    s = m.size
    yy, xx = np.mgrid[:s, :s]
    disc = ((yy - s / 2) ** 2 + (xx - s / 2) ** 2 < (s / 3) ** 2).astype(np.uint8) * 255
    edges = edge_map(np.repeat(disc[None, :, :, None], 3, axis=-1))
    return torch.from_numpy(edges).permute(0, 3, 1, 2).float() / 255


def _measure(configs: list[tuple], trials: int) -> list[tuple[float, list[dict]]]:
    """Median seconds and the reports of each (runtime, fresh_cache, generation, cold_lora) config, the configs
    interleaved trial by trial so that a change in the machine's load falls on all of them alike. Before each run a
    fresh cache holds the ControlNet, and the LoRA unless it is to be cold; the first round is a warm-up."""
    times, reports = [[] for _ in configs], [[] for _ in configs]
    for trial in range(trials + 1):
        for i, (rt, fresh_cache, g, cold_lora) in enumerate(configs):
            rt.cache = fresh_cache()
            if g.controlnet:
                rt.cache.get("controlnet", g.controlnet)
            if not cold_lora:
                for name, _ in g.loras:
                    rt.cache.get("lora", name)
            t = time.perf_counter()
            with torch.inference_mode():
                _, rep = rt.generate(g)
            if trial:
                times[i].append(time.perf_counter() - t)
                reports[i].append(rep)
    return [(statistics.median(t), r) for t, r in zip(times, reports)]


def _headroom(rounds: int = 3) -> tuple[float, float]:
    """Seconds for two one-thread matmul loops run one after the other and on two threads at once (median of
    `rounds`): how much parallelism the machine has to give right now, the cap of any concurrent ControlNet."""
    import threading

    x = torch.randn(512, 512)

    def work():
        torch.set_num_threads(1)
        for _ in range(100):
            x @ x

    seq, par = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        work()
        work()
        seq.append(time.perf_counter() - t)
        t = time.perf_counter()
        other = threading.Thread(target=work)
        other.start()
        work()
        other.join()
        par.append(time.perf_counter() - t)
    return statistics.median(par), statistics.median(seq)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path,
                    help="A diffusers StableDiffusionPipeline folder (default: an untrained tiny SD).")
    ap.add_argument("--addons", type=Path, help="An add-on store (lora/NAME/, controlnet/NAME/).")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--wait-fraction", type=float, default=0.4, help="K/N: where a request waits for its LoRA.")
    ap.add_argument("--fetch-delay-ms", type=float, default=300.0, help="Extra latency of the slower store.")
    ap.add_argument("--quality-seeds", type=int, default=8)
    opts = ap.parse_args()

    from distillery.papers.swift_diffusion.evaluate import LandsAt, ssim
    from distillery.papers.swift_diffusion.runtime import Generation, SwiftRuntime
    from distillery.serving.swift_diffusion import BaselineDiffusionModel, SwiftDiffusionModel

    work = RESULTS / "homes" / f"swift-diffusion-{int(time.time())}"
    model = _model_folder(opts, work)
    store = Path(json.loads((model / "distillery.json").read_text())["addons_uri"])
    lora = sorted(p.name for p in (store / "lora").iterdir())[0]
    controlnet = sorted(p.name for p in (store / "controlnet").iterdir())[0]
    rows, extra = [], {"steps": opts.steps, "wait_fraction": opts.wait_fraction, "base": str(opts.base or "untrained")}

    def gen(loras=(), cn=False, seeds=(0,), **kw):
        return Generation(prompts=["a handwritten digit seven"] * len(seeds), seeds=list(seeds), steps=opts.steps,
                          guidance=opts.guidance, loras=[(n, 1.0) for n in loras],
                          controlnet=controlnet if cn else None,
                          control_image=_control_image(ours).repeat(len(seeds), 1, 1, 1) if cn else None, **kw)

    def split_runtime(m):  # the same model and cache, guidance's halves on two threads
        return SwiftRuntime(m.pipe, m.runtime.cache, wait_fraction=opts.wait_fraction, guidance_split=True,
                            controlnet_process=m.addon_limits["controlnet_process"])

    def both_halves_runtime(m):  # the same, the concurrent ControlNet on both of guidance's halves (as diffusers)
        return SwiftRuntime(m.pipe, m.runtime.cache, wait_fraction=opts.wait_fraction, controlnet_cond_only=False,
                            controlnet_process=m.addon_limits["controlnet_process"])

    # 1. one ControlNet + one cold LoRA, ours (eager: without and with the guidance split; compiled) vs diffusers,
    # two store latencies. The compiled runtime has a model of its own: compiling replaces its UNet's forward.
    compiled = _predictor(SwiftDiffusionModel, model, 0.0, compile_backbone=True)
    extra["compiled_load_s"] = round(compiled.load_s, 1)
    for delay_ms in (0.0, opts.fetch_delay_ms):
        ours = _predictor(SwiftDiffusionModel, model, delay_ms / 1000)
        base = _predictor(BaselineDiffusionModel, model, delay_ms / 1000)
        compiled_cache = _caches(compiled, delay_ms / 1000)
        g = gen([lora], cn=True)
        (t_ours, reps), (t_both, _), (t_split, _), (t_comp, creps), (t_base, _) = _measure(
            [(ours.runtime, ours.fresh_cache, g, True), (both_halves_runtime(ours), ours.fresh_cache, g, True),
             (split_runtime(ours), ours.fresh_cache, g, True), (compiled.runtime, compiled_cache, g, True),
             (base.runtime, base.fresh_cache, g, True)], opts.trials)
        rows += [(f"ControlNet + cold LoRA, store +{delay_ms:.0f} ms: latency", t_ours, t_base, "s"),
                 ("  the same, the ControlNet on both halves", t_both, t_base, "s"),
                 ("  the same with guidance split (ControlNet on the conditional half)", t_split, t_base, "s"),
                 ("  the same, compiled backbone (ControlNet before the UNet, conditional half)", t_comp, t_base, "s")]
        extra[f"applied_from_step_store_{delay_ms:.0f}ms"] = [r["loras"][0]["applied_from_step"] for r in reps]
        extra[f"compiled_applied_from_step_store_{delay_ms:.0f}ms"] = [r["loras"][0]["applied_from_step"]
                                                                      for r in creps]

    # 2. overhead vs no add-on (ours; the cold LoRA's fetch delay chosen to fit within K steps)
    ((plain, _),) = _measure([(ours.runtime, ours.fresh_cache, gen(), False)], opts.trials)
    wait_step = ours.runtime.wait_step(opts.steps)
    delay_s = 0.5 * wait_step * plain / opts.steps
    ours = _predictor(SwiftDiffusionModel, model, delay_s)
    sequential_rt = SwiftRuntime(ours.pipe, ours.runtime.cache, wait_fraction=opts.wait_fraction,
                                 parallel_controlnet=False)
    thread_rt = SwiftRuntime(ours.pipe, ours.runtime.cache, wait_fraction=opts.wait_fraction, controlnet_process=False)
    rt, fresh = ours.runtime, ours.fresh_cache
    split_rt, both_rt = split_runtime(ours), both_halves_runtime(ours)
    comp_rt, comp_fresh = compiled.runtime, _caches(compiled, delay_s)
    (plain, _), (cold, reps), (hot, _), (parallel, _), (both_cn, _), (sequential, _), (threaded, _), (split, _), \
        (split_cn, _), (comp_plain, _), (comp_cold, _), (comp_cn, _) = _measure(
            [(rt, fresh, gen(), False), (rt, fresh, gen([lora]), True), (rt, fresh, gen([lora]), False),
             (rt, fresh, gen(cn=True), False), (both_rt, fresh, gen(cn=True), False),
             (sequential_rt, fresh, gen(cn=True), False), (thread_rt, fresh, gen(cn=True), False),
             (split_rt, fresh, gen(), False), (split_rt, fresh, gen(cn=True), False),
             (comp_rt, comp_fresh, gen(), False), (comp_rt, comp_fresh, gen([lora]), True),
             (comp_rt, comp_fresh, gen(cn=True), False)], opts.trials)
    rows += [(f"cold LoRA (fetch {delay_s * 1000:.0f} ms < K={wait_step} steps) vs no add-on", cold, plain, "s"),
             ("resident LoRA vs no add-on", hot, plain, "s"),
             ("ControlNet concurrent, conditional half vs no add-on", parallel, plain, "s"),
             ("ControlNet concurrent, both halves vs no add-on", both_cn, plain, "s"),
             ("ControlNet sequential, both halves vs no add-on", sequential, plain, "s"),
             ("ControlNet, both halves: concurrent vs sequential", both_cn, sequential, "s"),
             ("ControlNet, both halves: own process vs a thread of the server's", both_cn, threaded, "s"),
             ("ControlNet concurrent: conditional half vs both halves", parallel, both_cn, "s"),
             ("no add-on: guidance split vs one batched call", split, plain, "s"),
             ("ControlNet, conditional half: split vs one batched call", split_cn, parallel, "s"),
             ("compiled backbone, no add-on vs eager no add-on", comp_plain, plain, "s"),
             ("compiled backbone: cold LoRA vs no add-on", comp_cold, comp_plain, "s"),
             ("compiled backbone: ControlNet (before the UNet, conditional half) vs no add-on", comp_cn, comp_plain,
              "s"),
             ("ControlNet, conditional half: compiled vs eager concurrent", comp_cn, parallel, "s"),
             ("machine headroom: two kernel threads vs one after the other", *_headroom(), "s")]
    extra["cold_lora_applied_from_step"] = [r["loras"][0]["applied_from_step"] for r in reps]

    # 3. quality: the LoRA lands at exactly K; SSIM against the from-step-0 images
    seeds = list(range(opts.quality_seeds))
    real_cache = ours.runtime.cache
    images = {}
    for frac in (0.0, 0.1, 0.2, 0.4):
        k = round(frac * opts.steps)
        ours.runtime.wait_fraction, ours.runtime.cache = k / opts.steps, LandsAt(real_cache, ours.pipe.unet, k)
        try:
            images[frac], rep = ours.runtime.generate(gen([lora], seeds=seeds), output_type="np")
        finally:
            ours.runtime.cache.close()
        assert rep["loras"][0]["applied_from_step"] == k
    ours.runtime.cache = real_cache
    floor, _ = ours.runtime.generate(gen(seeds=seeds), output_type="np")
    floor_ssim = float(ssim(images[0.0], floor).mean())
    for frac in (0.1, 0.2, 0.4):
        rows.append((f"SSIM vs from-step-0, LoRA from K/N={frac} (baseline col: no LoRA)",
                     float(ssim(images[0.0], images[frac]).mean()), floor_ssim, ""))
    # the ControlNet on the conditional half only (the default, and the split's), against diffusers' both halves
    both, _ = both_rt.generate(gen(cn=True, seeds=seeds), output_type="np")
    cond_only, _ = ours.runtime.generate(gen(cn=True, seeds=seeds), output_type="np")
    split_cond, _ = split_rt.generate(gen(cn=True, seeds=seeds), output_type="np")
    for label, img in (("", cond_only), (", split", split_cond)):
        rows.append((f"SSIM vs both halves: ControlNet on the conditional half{label} (baseline col: no ControlNet)",
                     float(ssim(both, img).mean()), float(ssim(both, floor).mean()), ""))
    extra["cores"], extra["controlnet_threads"] = ours.runtime.cores, ours.addon_limits["controlnet_threads"]
    report("swift-diffusion", rows, extra)


if __name__ == "__main__":
    main()
