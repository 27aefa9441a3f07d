"""Hybrid SD evaluation: quality per split point and order against cloud cost, and the edge model's costs.

Every row generates the same held-out prompts with the same seeds through the project's evaluator (FD, KID and
conditional accuracy in the feature network's space). A row is (order, k): the first model runs k of N steps,
the second the rest; the images are decoded by the VAE of the side that ran the last step (the tiny VAE on the
edge, the teacher's in the cloud). Cloud cost is the large UNet's FLOPs per image, counted by torch's
FlopCounterMode on one UNet evaluation and multiplied by the large model's evaluations (guidance included).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from distillery.papers.hybrid_sd import sampler

ROW_METRICS = ("fd", "fd_ci_low", "fd_ci_high", "kid", "cond_acc", "latency_s", "large_steps", "cloud_flops",
               "cloud_fraction")


def unet_inputs(unet, batch: int = 1, tokens: int = 8):
    size = unet.config.sample_size
    return (torch.randn(batch, unet.config.in_channels, size, size), torch.tensor([500] * batch),
            torch.randn(batch, tokens, unet.config.cross_attention_dim))


@torch.no_grad()
def unet_flops(unet, tokens: int = 8) -> float:
    """FLOPs of one UNet evaluation of one sample (torch's operator-level counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    x, t, c = unet_inputs(unet, 1, tokens)
    with FlopCounterMode(display=False) as counter:
        unet(x, t, encoder_hidden_states=c)
    return float(counter.get_total_flops())


@torch.no_grad()
def paired_seconds(fn_a, fn_b, repeats: int = 9, warmup: int = 2) -> tuple[float, float]:
    """Median seconds of two calls timed in alternation: on a shared machine, load that comes and goes hits both
    alike, where two medians taken one after the other can see different loads and swing their ratio."""
    for _ in range(warmup):
        fn_a(), fn_b()
    times: tuple[list, list] = ([], [])
    for _ in range(repeats):
        for fn, out in zip((fn_a, fn_b), times):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return float(np.median(times[0])), float(np.median(times[1]))


@torch.no_grad()
def unet_step_seconds_pair(large, small, batch: int = 2, tokens: int = 8) -> tuple[float, float]:
    """CPU time of one sampling step (batch 2: the guided and unguided rows of one image) of two UNets on the same
    inputs, timed in alternation (`paired_seconds`)."""
    x, t, c = unet_inputs(large, batch, tokens)
    return paired_seconds(lambda: large(x, t, encoder_hidden_states=c), lambda: small(x, t, encoder_hidden_states=c))


@torch.no_grad()
def vae_report(teacher_vae, tiny_vae, images: np.ndarray) -> dict:
    """Decode time per image batch (timed in alternation) and reconstruction PSNR of both VAEs on the same
    held-out images."""
    from distillery.models.tiny_sd import encode_latents, to_tensor

    x = to_tensor(images)
    z, _ = encode_latents(teacher_vae, images)  # teacher latents in diffusion space
    t_teacher, t_tiny = paired_seconds(lambda: teacher_vae.decode(z / teacher_vae.config.scaling_factor),
                                       lambda: tiny_vae.decode(z / tiny_vae.config.scaling_factor))

    def psnr(rec):
        mse = ((rec.clamp(-1, 1) - x) / 2).pow(2).mean((1, 2, 3)).clamp(min=1e-10)
        return float((10 * torch.log10(1 / mse)).mean())

    p_teacher = psnr(teacher_vae.decode(z / teacher_vae.config.scaling_factor).sample)
    p_tiny = psnr(tiny_vae.decode(tiny_vae.encode(x).latents / tiny_vae.config.scaling_factor).sample)
    p_tiny_dec = psnr(tiny_vae.decode(z / tiny_vae.config.scaling_factor).sample)
    return {"vae_decode_s": t_teacher, "tiny_vae_decode_s": t_tiny, "tiny_vae_decode_ratio": t_tiny / t_teacher,
            "vae_psnr": p_teacher, "tiny_vae_psnr": p_tiny, "tiny_vae_decoder_psnr": p_tiny_dec,
            "tiny_vae_psnr_drop": p_teacher - p_tiny}


def rows_to_run(steps: int, splits: list[int], orders: list[str]) -> list[tuple[str, int]]:
    """(order, k) rows: large alone, small alone, then every interior split in each order."""
    bad = [k for k in splits if not 0 <= int(k) <= steps]
    if bad:
        raise ValueError(f"splits must lie in [0, {steps}] (steps), got {bad}")
    unknown = sorted(set(orders) - set(sampler.ORDERS))
    if unknown or not orders:
        raise ValueError(f"orders must be a non-empty subset of {sampler.ORDERS}, got {orders}")
    rows = [("large", steps), ("small", steps)]
    rows += [(o, int(k)) for o in orders for k in sorted(set(int(k) for k in splits)) if 0 < int(k) < steps]
    return rows


def large_steps(order: str, k: int, steps: int) -> int:
    return {"large": steps, "small": 0, "large-small": k, "small-large": steps - k}[order]


def row_key(order: str, k: int, steps: int) -> str:
    if order in ("large", "small"):
        return f"{order}_only"
    return f"{order.replace('-', '_')}_{k}of{steps}"


def split_table(pipe, small_unet, tiny_vae, holdout, feature_net, *, steps: int, splits: list[int],
                orders: list[str], guidance_scale: float, num_per_class: int, seed: int = 0,
                extra_small: dict | None = None, swap_vaes: bool = True) -> tuple[list[dict], dict]:
    """One row per (order, k), plus a row per `extra_small` UNet alone (e.g. the uniform-pruning baseline).
    A row that ends on the small model decodes with the tiny VAE, as the edge does. `swap_vaes` adds the rows that
    tell the UNet's share of an FD from the VAE's: the large model alone through the tiny VAE (`*_tiny_vae`), and
    each small UNet alone through the teacher's VAE (`*_sd_vae`, the pruning compared on the UNets alone).
    Returns rows and {row key: sample grid}."""
    from distillery.models import image_eval

    large = pipe.unet
    flops = unet_flops(large)
    evals = 2 if guidance_scale > 1.0 else 1
    jobs = [(o, k, small_unet, None) for o, k in rows_to_run(steps, splits, orders)]
    jobs += [(name, steps, unet, None) for name, unet in (extra_small or {}).items()]
    if swap_vaes:
        jobs += [("large", steps, small_unet, "tiny_vae"), ("small", steps, small_unet, "sd_vae")]
        jobs += [(name, steps, unet, "sd_vae") for name, unet in (extra_small or {}).items()]
    vaes = {"tiny_vae": tiny_vae, "sd_vae": pipe.vae}
    rows, grids = [], {}
    for order, k, small, swap in jobs:
        first, second = {"large": (large, large), "large-small": (large, small),
                         "small-large": (small, large)}.get(order, (small, small))
        n_large = large_steps(order, k, steps) if order in ("large", "small", *sampler.ORDERS) else 0
        last_is_large = second is large and (k < steps or first is large)
        vae = vaes[swap] if swap else pipe.vae if last_is_large else tiny_vae

        def gen(prompts, seeds, first=first, second=second, k=k, vae=vae):
            latents = sampler.hybrid_latents(pipe, first, second, prompts, seeds, steps=steps, k=k,
                                             guidance_scale=guidance_scale)
            return sampler.decode(vae, latents)

        result = image_eval.evaluate_text_to_image(pipe, holdout, feature_net, num_per_class=num_per_class,
                                                   steps=steps, guidance_scale=guidance_scale, seed=seed,
                                                   generate_fn=gen, latency_probes=1)
        key = row_key(order, k, steps) if order in ("large", "small", *sampler.ORDERS) else f"{order}_only"
        key += f"_{swap}" if swap else ""
        grids[key] = result.pop("grid")
        rows.append({"row": key, "order": f"{order}, {swap.replace('_', ' ')}" if swap else order, "k": k,
                     "steps": steps, "large_steps": n_large,
                     "cloud_flops": n_large * evals * flops, "cloud_fraction": n_large / steps,
                     **{m: result[m] for m in ROW_METRICS if m in result}})
    return rows, grids


def headline(rows: list[dict], *, steps: int, split: int, uniform_row: str | None = None) -> dict:
    """The issue's targets at k/N = split/steps in Hybrid SD's order, plus which order wins there."""
    by = {r["row"]: r for r in rows}
    large, small = by["large_only"], by["small_only"]
    out = {"fd_large": large["fd"], "fd_small": small["fd"], "cond_acc_large": large["cond_acc"],
           "cond_acc_small": small["cond_acc"]}
    for order in sampler.ORDERS:
        key = row_key(order, split, steps)
        if key not in by:
            continue
        r, tag = by[key], order.replace("-", "_")
        gap = small["fd"] - large["fd"]
        out[f"fd_{tag}"] = r["fd"]
        out[f"cond_acc_{tag}"] = r["cond_acc"]
        out[f"fd_ratio_{tag}_vs_large"] = r["fd"] / max(large["fd"], 1e-12)
        out[f"gap_recovered_{tag}"] = (small["fd"] - r["fd"]) / gap if gap > 0 else float("nan")
        out[f"cloud_flops_ratio_{tag}"] = r["cloud_flops"] / max(large["cloud_flops"], 1e-12)
    if "fd_large_small" in out:
        out["fd"], out["cond_acc"] = out["fd_large_small"], out["cond_acc_large_small"]
    if "fd_large_small" in out and "fd_small_large" in out:
        out["large_small_wins"] = float(out["fd_large_small"] <= out["fd_small_large"])
    if uniform_row and uniform_row in by:
        out["fd_uniform"] = by[uniform_row]["fd"]
        out["fd_ratio_scored_vs_uniform"] = small["fd"] / max(by[uniform_row]["fd"], 1e-12)
        if f"{uniform_row}_sd_vae" in by and "small_only_sd_vae" in by:  # the pruning alone, without the tiny VAE
            out["fd_ratio_scored_vs_uniform_sd_vae"] = (by["small_only_sd_vae"]["fd"]
                                                         / max(by[f"{uniform_row}_sd_vae"]["fd"], 1e-12))
    if "large_only_tiny_vae" in by:  # what the tiny VAE alone costs the large model's images
        out["fd_ratio_tiny_vae_on_large"] = by["large_only_tiny_vae"]["fd"] / max(large["fd"], 1e-12)
    return out


def markdown(rows: list[dict]) -> str:
    head = "| row | large steps / N | cloud GFLOPs/img | FD [95% CI] | KID | cond acc | latency s |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['row']} | {r['large_steps']}/{r['steps']} | {r['cloud_flops'] / 1e9:.3g} | "
                     f"{r['fd']:.3g} [{r['fd_ci_low']:.3g}, {r['fd_ci_high']:.3g}] | {r['kid']:.3g} | "
                     f"{r['cond_acc']:.3f} | {r['latency_s']:.3g} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict]):
    """Quality (FD) against cloud cost (share of the large model's FLOPs), one line per order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {r["row"]: r for r in rows}
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for order in sampler.ORDERS:
        pts = [by["small_only"]] + [r for r in rows if r["order"] == order] + [by["large_only"]]
        pts = sorted(pts, key=lambda r: r["cloud_fraction"])
        ax.plot([r["cloud_fraction"] for r in pts], [r["fd"] for r in pts], marker="o", label=order)
    for r in rows:
        if r["order"] not in ("large", "small", *sampler.ORDERS):
            ax.scatter([r["cloud_fraction"]], [r["fd"]], marker="x", label=r["row"])
    ax.set_xlabel("cloud cost (share of large-only UNet FLOPs)")
    ax.set_ylabel("FD (lower is better)")
    ax.legend()
    fig.tight_layout()
    return fig
