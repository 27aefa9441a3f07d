"""SwiftDiffusion steps: train one add-on (a ControlNet on edge maps or a LoRA style) on the base model, evaluate it
against the base with the versioned evaluator, register the add-on store, and evaluate serving (the swift runtime
against the plain-diffusers baseline on the registered store) while assembling the runtime release."""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from distillery.steps import (checkpoint_dir, dir_hash, evaluator_identity, load_dataset, load_sd_pipeline,
                              log_metrics)

ADDON_FILE = "addon.json"  # beside an add-on's weights: its store path (kind/name) and its training numbers
KINDS = ("controlnet", "lora")
CONTROLNET_NAME = "edges"  # the one ControlNet: Sobel edge maps (addons.edge_map)
LATE_PATCH_FRACTION = 0.2  # K/N the gate judges late patching at (SSIM and FD against the from-step-0 LoRA)
LATE_PATCH_FRACTIONS = (0.1, LATE_PATCH_FRACTION, 0.4)  # the K/N the serving evaluation measures
ADDON_PARALLELISM = 4  # add-on tasks the pipeline runs side by side


def _share_cores() -> None:
    """The add-on tasks run side by side. In a pod, set_cpu_threads (run_step) sized torch to the pod's CPU limit;
    without a limit (the local runners) each task would take every core and their OpenMP threads spin against each
    other: UNet calls 9x slower were measured with two such tasks on 2 busy cores. Then each takes its share."""
    import os

    import torch

    from distillery.models.training import cpu_limit
    from distillery.settings import get_settings

    if get_settings().cpu_threads is None and cpu_limit() is None:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ADDON_PARALLELISM))


def parse_addon(addon: str) -> tuple[str, str]:
    """"lora/inverted" -> ("lora", "inverted"); the add-on's path in the store, checked."""
    from distillery.papers.swift_diffusion.addons import STYLES

    kind, _, name = str(addon).partition("/")
    if kind == "lora" and name in STYLES or kind == "controlnet" and name == CONTROLNET_NAME:
        return kind, name
    raise ValueError(f"add-on must be controlnet/{CONTROLNET_NAME} or lora/<style> with a style of {sorted(STYLES)}, "
                     f"got {addon!r}")


def train_addon(*, base_dir: str, dataset_dir: str, out_dir: str, addon: str, lora_steps: int, lora_rank: int,
                lora_lr: float, controlnet_steps: int, controlnet_lr: float, batch_size: int, cond_dropout: float,
                seed: int) -> dict:
    """One add-on on the frozen base: a LoRA of its style or the edge-map ControlNet, written to `out_dir` with
    `addon.json` naming it."""
    from distillery.papers.swift_diffusion import train

    kind, name = parse_addon(addon)
    _share_cores()
    ds = load_dataset(dataset_dir)
    common = dict(batch_size=batch_size, cond_dropout=cond_dropout, seed=seed)
    if kind == "lora":
        cfg = train.LoRATrainConfig(steps=lora_steps, lr=lora_lr, rank=lora_rank, alpha=float(lora_rank), style=name,
                                    **common).check()
        fit = train.train_lora
    else:
        cfg = train.ControlNetTrainConfig(steps=controlnet_steps, lr=controlnet_lr, **common).check()
        fit = train.train_controlnet
    ckpt = checkpoint_dir(f"swift-{kind}-{name}", data=ds.manifest["content_sha256"], base=dir_hash(Path(base_dir)),
                          cfg=cfg)
    metrics = fit(ds.train(), Path(base_dir), Path(out_dir), cfg, checkpoint_dir=ckpt, on_log=log_metrics)
    (Path(out_dir) / ADDON_FILE).write_text(json.dumps({"kind": kind, "name": name, "path": f"{kind}/{name}"}))
    return metrics


def _class_conditions(hold, num_per_class: int) -> dict[str, np.ndarray]:
    """Per class prompt, the edge maps of its held-out images (cycled to num_per_class) and those images."""
    from distillery.papers.swift_diffusion.addons import edge_map

    out = {}
    for c, prompt in enumerate(hold.class_prompts):
        idx = np.nonzero(hold.labels == c)[0]
        if not len(idx):
            raise ValueError(f"the holdout has no image of class {c} ({prompt!r}) to take an edge map from")
        src = hold.images[np.resize(idx, num_per_class)]
        out[prompt] = (edge_map(src), src)
    return out


def _edge_f1(images: np.ndarray, conditions: np.ndarray) -> np.ndarray:
    """Per image, the F1 of its own edge map against the condition's edges: does the output follow the outline."""
    from distillery.papers.swift_diffusion.addons import edge_map

    got, want = edge_map(images)[..., 0] > 0, conditions[..., 0] > 0
    tp = (got & want).sum(axis=(1, 2))
    return 2 * tp / np.maximum(got.sum(axis=(1, 2)) + want.sum(axis=(1, 2)), 1)


def evaluate_addon(*, base_dir: str, addon_dir: str, dataset_dir: str, feature_net_dir: str, num_per_class: int,
                   steps: int, guidance_scale: float, seed: int) -> dict:
    """Does the add-on change the output as intended? The same prompts and seeds with and without it, scored by the
    versioned evaluator. A LoRA: FD to the held-out images in its style (`style_fd`, also for the base: the ratio
    below 1 means it moved the output toward the style) and how much of the base image it kept (SSIM). The
    ControlNet, fed the edge maps of held-out images: how well the outputs' edges match them (edge F1, vs the
    base's), FD and conditional accuracy to the real holdout, SSIM to the images the edges came from."""
    import torch

    from distillery.models import image_eval
    from distillery.papers.swift_diffusion.addons import LORA_FILE, stylize
    from distillery.papers.swift_diffusion.evaluate import ssim
    from distillery.platform import tracking

    info = json.loads((Path(addon_dir) / ADDON_FILE).read_text())
    kind, name = parse_addon(info["path"])
    _share_cores()
    ds = load_dataset(dataset_dir)
    hold = ds.holdout()
    pipe = load_sd_pipeline(base_dir, "base model")
    net = image_eval.FeatureNet.load(Path(feature_net_dir))
    ev = dict(num_per_class=num_per_class, steps=steps, guidance_scale=guidance_scale, seed=seed, latency_probes=1)
    made: dict[str, list] = {"base": [], "addon": []}

    def recorded(tag, fn):
        def generate_fn(prompts, seeds):
            images = fn(prompts, seeds)
            made[tag].append(images)
            return images
        return generate_fn

    def plain(prompts, seeds):
        return image_eval.generate(pipe, prompts, seeds, steps=steps, guidance_scale=guidance_scale)

    prefix = f"{kind}_{name}"
    if kind == "lora":
        target = SimpleNamespace(images=stylize(hold.images, name), class_prompts=hold.class_prompts)
        base = image_eval.evaluate_text_to_image(pipe, target, net, generate_fn=recorded("base", plain), **ev)
        pipe.load_lora_weights(addon_dir, weight_name=LORA_FILE)
        try:
            result = image_eval.evaluate_text_to_image(pipe, target, net, generate_fn=recorded("addon", plain), **ev)
        finally:
            pipe.unload_lora_weights()
        metrics = {"style_fd": result["fd"], "base_style_fd": base["fd"],
                   "style_fd_ratio": result["fd"] / max(base["fd"], 1e-9), "cond_acc": result["cond_acc"]}
    else:
        from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

        conditions = _class_conditions(hold, num_per_class + 1)  # one more: the latency probe's
        controlnet = ControlNetModel.from_pretrained(addon_dir, use_safetensors=True).eval()
        cn_pipe = StableDiffusionControlNetPipeline(**{k: v for k, v in pipe.components.items()
                                                       if k != "image_encoder"},
                                                    controlnet=controlnet, requires_safety_checker=False)
        cn_pipe.set_progress_bar_config(disable=True)

        def guided(prompts, seeds):
            hint = torch.from_numpy(conditions[prompts[0]][0][:len(prompts)]).permute(0, 3, 1, 2).float() / 255
            gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
            with torch.inference_mode():
                out = cn_pipe(prompts, image=hint, num_inference_steps=steps, guidance_scale=guidance_scale,
                              generator=gens, output_type="np").images
            return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)

        base = image_eval.evaluate_text_to_image(pipe, hold, net, generate_fn=recorded("base", plain), **ev)
        result = image_eval.evaluate_text_to_image(pipe, hold, net, generate_fn=recorded("addon", guided), **ev)
        hints = np.concatenate([conditions[p][0][:num_per_class] for p in hold.class_prompts])
        sources = np.concatenate([conditions[p][1][:num_per_class] for p in hold.class_prompts])
        metrics = {"fd": result["fd"], "base_fd": base["fd"], "cond_acc": result["cond_acc"],
                   "base_cond_acc": base["cond_acc"]}
    # The batched generations (one per class), not the latency probes.
    base_images = np.concatenate(made["base"][:len(hold.class_prompts)])
    addon_images = np.concatenate(made["addon"][:len(hold.class_prompts)])
    if kind == "lora":
        metrics["ssim_vs_base"] = float(ssim(base_images / 255, addon_images / 255).mean())
    else:
        metrics["edge_f1"] = float(_edge_f1(addon_images, hints).mean())
        metrics["base_edge_f1"] = float(_edge_f1(base_images, hints).mean())
        metrics["ssim_to_source"] = float(ssim(addon_images / 255, sources / 255).mean())
        metrics["base_ssim_to_source"] = float(ssim(base_images / 255, sources / 255).mean())
    tracking.log_image(image_eval.make_grid([*base_images[:8], *addon_images[:8]], nrow=8),
                       f"samples/{prefix}.png")  # top row the base, bottom row with the add-on, same seeds
    return {**{f"{prefix}_{k}": float(v) for k, v in metrics.items()}, **evaluator_identity(feature_net_dir)}


def summarize_addons(evaluations: list) -> dict:
    """The collected add-on evaluations as one flat dict, plus the worst LoRA's style FD ratio (what the gate bounds:
    every LoRA must move the output toward its style)."""
    merged: dict[str, float] = {}
    for part in evaluations:
        merged.update(json.loads(part) if isinstance(part, str) else part)
    ratios = [v for k, v in merged.items() if k.startswith("lora_") and k.endswith("_style_fd_ratio")]
    if ratios:
        merged["lora_style_fd_ratio_max"] = max(ratios)
    cn = [k[:-len("_edge_f1")] for k in merged if k.startswith("controlnet_") and k.endswith("_edge_f1")
          and not k.endswith("_base_edge_f1")]
    for prefix in cn:
        merged[f"{prefix}_edge_f1_gain"] = merged[f"{prefix}_edge_f1"] - merged[f"{prefix}_base_edge_f1"]
    return merged


def register_addons(*, addons: list, evaluations: list, model_name: str, store_dir: str) -> dict:
    """The trained add-ons as one store folder (lora/NAME/, controlnet/NAME/: the layout the swift-diffusion
    predictor reads), registered as a version of `<model_name>-addons`: the version's folder on the object store is
    the immutable add-on store the runtime release points at. Every add-on's evaluation rides on the version."""
    import mlflow

    from distillery.platform import registry, storage

    store = Path(store_dir)
    seen = []
    for addon_dir in addons:
        info = json.loads((Path(addon_dir) / ADDON_FILE).read_text())
        kind, name = parse_addon(info["path"])
        if (kind, name) in seen:
            raise ValueError(f"add-on {kind}/{name} was trained twice: list each add-on once")
        seen.append((kind, name))
        shutil.copytree(addon_dir, store / kind / name)
    if not any(k == "controlnet" for k, _ in seen) or not any(k == "lora" for k, _ in seen):
        raise ValueError(f"the store needs a ControlNet and at least one LoRA, got {seen}")
    metrics = summarize_addons(evaluations)
    name = f"{model_name}-addons"
    weights = {f"sha256.{p.relative_to(store)}": storage.sha256_file(p)[:16] for p in sorted(store.rglob("*.safetensors"))}
    version = registry.register_dir(name, store, mlflow.active_run().info.run_id,
                                    tags={"addons": ",".join(f"{k}/{n}" for k, n in sorted(seen)), **weights},
                                    metrics=metrics)
    uri = registry.storage_uri(name, version)
    (store / "store.json").write_text(json.dumps({"name": name, "version": version, "uri": uri}))
    mlflow.set_tag("addons_uri", uri)
    return {"addons_name": name, "addons_version": version, "addons_uri": uri, **metrics,
            "addons_registered_version": float(version), "addons_count": float(len(seen))}


# ----------------------------------------------------------------------------------------------- serving


def _predictor(kind, folder: Path):
    m = kind("evaluate", folder)
    m.check()
    m.load_model()
    m.pipe.set_progress_bar_config(disable=True)
    return m


def _timed(runs: list[tuple], trials: int) -> list[float]:
    """Median seconds of each (predictor, generation, resident add-ons) run, interleaved trial by trial so a change
    of the machine's load falls on every run alike; each run starts from a fresh cache holding only the add-ons
    listed as resident (the others are cold: fetched from the store during the request). Round 0 warms up."""
    import torch

    from distillery.papers.swift_diffusion.runtime import AddonCache

    times: list[list[float]] = [[] for _ in runs]
    for trial in range(trials + 1):
        for i, (m, g, resident) in enumerate(runs):
            m.runtime.cache = AddonCache(m._load_addon, m.addon_limits["addon_cache_bytes"])
            for key in resident:
                m.runtime.cache.get(*key)
            t = time.perf_counter()
            with torch.inference_mode():
                m.runtime.generate(g)
            if trial:
                times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def evaluate_serving(*, base_dir: str, store_dir: str, addon_metrics: str, dataset_dir: str, feature_net_dir: str,
                     steps: int, guidance_scale: float, wait_fraction: float, trials: int, quality_seeds: int,
                     num_per_class: int, seed: int, release_dir: str, compile_backbone: bool = False) -> dict:
    """The runtime release (the base pipeline + distillery.json: kind swift-diffusion, the registered add-on store)
    served in-process by the predictor and by its plain-diffusers twin, on the registered store: latency of one
    ControlNet + one cold LoRA (ours / baseline), the add-on overhead of a cold LoRA and of the ControlNet vs a
    no-add-on request, and the quality of late patching of every registered LoRA: it lands at K/N in
    LATE_PATCH_FRACTIONS against it applied from step 0, as SSIM over `quality_seeds` images (no LoRA: the floor)
    and as the ratio of FDs to the held-out images in its style (`num_per_class` per class, the versioned
    evaluator); lora_<name>_* per LoRA, the worst LoRA's as ssim_late_k*/fd_ratio_late_k* (the gate's) and the mean
    beside them. `compile_backbone` goes into the release's distillery.json: the predictor measured here (and
    deployed) is then the compiled one, its compile and warm-up time logged as serving_warmup_s. The add-on
    evaluations are carried along, so the gate sees every number."""
    import torch

    from distillery.models import image_eval
    from distillery.papers.swift_diffusion.addons import STYLES, edge_map, stylize
    from distillery.papers.swift_diffusion.evaluate import LandsAt, ssim
    from distillery.papers.swift_diffusion.runtime import Generation
    from distillery.serving.swift_diffusion import BaselineDiffusionModel, SwiftDiffusionModel

    if int(trials) < 1 or int(quality_seeds) < 1 or int(num_per_class) < 1 or int(steps) < 2:
        raise ValueError(f"trials, quality_seeds and num_per_class must be >= 1 and steps >= 2, got {trials}, "
                         f"{quality_seeds}, {num_per_class}, {steps}")
    if not 0 <= wait_fraction < 1:
        raise ValueError(f"wait_fraction must be in [0, 1), got {wait_fraction}")
    steps, trials = int(steps), int(trials)
    store = json.loads((Path(store_dir) / "store.json").read_text())
    release = Path(release_dir)
    shutil.copytree(base_dir, release, dirs_exist_ok=True, ignore=shutil.ignore_patterns("distillery.json"))
    (release / "distillery.json").write_text(json.dumps({
        "kind": "swift-diffusion", "addons_uri": store["uri"], "wait_fraction": wait_fraction,
        "compile_backbone": bool(compile_backbone), "addons_name": store["name"], "addons_version": store["version"]},
        indent=1))
    ours, base = _predictor(SwiftDiffusionModel, release), _predictor(BaselineDiffusionModel, release)
    loras, controlnet = ours.addon_names("lora"), ours.addon_names("controlnet")
    if not loras or not controlnet:
        raise ValueError(f"the registered store {store['uri']} lacks a LoRA or a ControlNet: {sorted(ours._index)}")
    lora, cn = ("lora", loras[0]), ("controlnet", controlnet[0])
    hold = load_dataset(dataset_dir).holdout()
    prompt = hold.class_prompts[0]
    hint = torch.from_numpy(edge_map(hold.images[:1])).permute(0, 3, 1, 2).float() / 255

    def gen(with_lora=False, with_cn=False, seeds=(seed,)):
        return Generation(prompts=[prompt] * len(seeds), seeds=list(seeds), steps=steps, guidance=guidance_scale,
                          loras=[(lora[1], 1.0)] if with_lora else [], controlnet=cn[1] if with_cn else None,
                          control_image=hint.repeat(len(seeds), 1, 1, 1) if with_cn else None)

    both = gen(True, True)
    t_ours, t_base, t_plain, t_cold, t_cn = _timed(
        [(ours, both, [cn]), (base, both, [cn]), (ours, gen(), []), (ours, gen(with_lora=True), []),
         (ours, gen(with_cn=True), [cn])], trials)

    # Late patching, per registered LoRA: it lands at exactly K (LandsAt), against it landing before step 0.
    rt, cache = ours.runtime, ours.runtime.cache
    applied: list[int] = []

    def lands_at(name: str, k: int, prompts: list, seeds: list) -> np.ndarray:
        rt.wait_fraction, rt.cache = k / steps, LandsAt(cache, ours.pipe.unet, k)
        try:
            with torch.inference_mode():
                out, rep = rt.generate(Generation(prompts=prompts, seeds=list(seeds), steps=steps,
                                                  guidance=guidance_scale, loras=[(name, 1.0)]), output_type="np")
        finally:
            rt.cache.close()
            rt.cache, rt.wait_fraction = cache, wait_fraction
        applied.append(rep["loras"][0]["applied_from_step"])
        return out

    net = image_eval.FeatureNet.load(Path(feature_net_dir))
    seeds = [seed + i for i in range(int(quality_seeds))]
    ks = {0: 0.0, **{max(1, round(f * steps)): f for f in LATE_PATCH_FRACTIONS}}
    with torch.inference_mode():
        floor, _ = rt.generate(gen(seeds=seeds), output_type="np")
    k_late = max(1, round(LATE_PATCH_FRACTION * steps))
    metrics = {"latency_cn_cold_lora_s": t_ours, "baseline_latency_cn_cold_lora_s": t_base,
               "latency_ratio_cn_cold_lora": t_ours / t_base, "latency_no_addon_s": t_plain,
               "cold_lora_overhead": t_cold / t_plain - 1, "controlnet_overhead": t_cn / t_plain - 1,
               "compiled_backbone": float(ours.runtime.compiled), "serving_warmup_s": ours.warmup_s,
               "late_patch_step": float(k_late), "late_patch_fraction": k_late / steps,
               "serving_steps": float(steps), "late_patch_loras": float(len(loras))}
    for name in loras:
        # FD to the held-out images in the LoRA's style (a name that is no style of ours: to the plain holdout).
        target = SimpleNamespace(images=stylize(hold.images, name) if name in STYLES else hold.images,
                                 class_prompts=hold.class_prompts)
        images, fd = {}, {}
        for k in ks:
            applied.clear()
            images[k] = lands_at(name, k, [prompt] * len(seeds), seeds)
            fd[k] = image_eval.evaluate_text_to_image(
                ours.pipe, target, net, num_per_class=int(num_per_class), steps=steps, guidance_scale=guidance_scale,
                seed=seed, latency_probes=1,
                generate_fn=lambda p, s, k=k: (lands_at(name, k, p, s) * 255).round().astype(np.uint8))["fd"]
            if set(applied) != {k}:
                raise RuntimeError(f"LoRA {name!r} was meant to land at step {k}, it landed at {sorted(set(applied))}")
        metrics[f"lora_{name}_fd_from_step_0"] = fd[0]
        metrics[f"lora_{name}_ssim_no_lora"] = float(ssim(images[0], floor).mean())
        for k, f in ks.items():  # every K/N measured, for the README's table and the run's comparison view
            if k:
                metrics[f"lora_{name}_ssim_late_k{round(100 * f)}"] = float(ssim(images[0], images[k]).mean())
                metrics[f"lora_{name}_fd_ratio_late_k{round(100 * f)}"] = fd[k] / max(fd[0], 1e-9)
    # The headline numbers are the worst LoRA's (the gate must hold for every add-on the runtime serves), with the
    # mean beside them: a LoRA that restyles the whole image (inverted) suffers from a late start far more than one
    # that changes detail.
    for f in sorted(set(ks.values()) - {0.0}):  # at few steps two K/N can round to one K: the later one is kept
        for kind, worst in (("ssim", min), ("fd_ratio", max)):
            per = [metrics[f"lora_{n}_{kind}_late_k{round(100 * f)}"] for n in loras]
            metrics[f"{kind}_late_k{round(100 * f)}"] = worst(per)
            metrics[f"{kind}_late_k{round(100 * f)}_mean"] = float(np.mean(per))
    tag = round(100 * LATE_PATCH_FRACTION)
    metrics.update(ssim_late_patch=metrics[f"ssim_late_k{tag}"], fd_ratio_late_patch=metrics[f"fd_ratio_late_k{tag}"])
    return {**json.loads(addon_metrics), **metrics, **evaluator_identity(feature_net_dir)}
