"""Significance-scored, tiered structural pruning of a Stable Diffusion UNet (Hybrid SD).

Candidate layers are the UNet's ResNet blocks and its attention (Transformer2D) blocks. A ResNet block loses
inner channels: the output channels of conv1 and of the time-embedding projection, the channels of norm2 and the
input channels of conv2, keeping the conv1 filters with the largest L2 norm, rounded to a multiple of norm2's
group count so the GroupNorm keeps its groups. An attention block loses heads of its self- and cross-attention
(query/key/value rows and output-projection columns of each removed head). Block inputs and outputs keep their
width, so every skip connection and the saved config stay as they were.

Keep ratios come from a significance score: one candidate at a time is pruned to 0.5, latents are generated for a
fixed prompt set with fixed seeds, and score = ||mean_base - mean_pruned|| + ||std_base - std_pruned||. The least
significant third keeps 0.25, the next third 0.5, the rest 0.75. `uniform_plan` is the baseline: one ratio for
every candidate, chosen to match a given parameter count.

A pruned UNet's inner widths are not expressible in `UNet2DConditionModel`'s config, so it is saved and loaded as
`PrunedUNet2DConditionModel`: the same class plus one config entry, `pruned_layers`, from which `__init__` builds
the narrower layers before `from_pretrained` loads the weights.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import torch
from torch import nn

TIER_RATIOS = (0.25, 0.5, 0.75)  # least significant third, middle third, most significant third
PROBE_RATIO = 0.5  # each candidate is pruned to this to score it


@dataclass(frozen=True)
class Candidate:
    name: str  # module path in the UNet
    kind: str  # "resnet" or "attention"


def candidates(unet) -> list[Candidate]:
    """Every ResNet block and attention block of the UNet, in module order."""
    out = []
    for name, module in unet.named_modules():
        kind = {"ResnetBlock2D": "resnet", "Transformer2DModel": "attention"}.get(type(module).__name__)
        if kind:
            out.append(Candidate(name, kind))
    return out


def _attentions(block) -> list:
    return [m for m in block.modules() if type(m).__name__ == "Attention"]


def _round_channels(channels: int, ratio: float, groups: int) -> int:
    """Kept channels: ratio of the width, rounded to a multiple of the GroupNorm group count (at least one group)."""
    return int(max(groups, min(channels, round(channels * ratio / groups) * groups)))


def _kept_heads(heads: int, ratio: float) -> int:
    return int(max(1, min(heads, round(heads * ratio))))


def layer_shapes(unet, plan: dict[str, float]) -> dict[str, dict]:
    """{candidate name: kept inner channels or heads} for a plan of keep ratios (what `pruned_layers` records)."""
    modules = dict(unet.named_modules())
    shapes = {}
    for name, ratio in plan.items():
        m = modules[name]
        if type(m).__name__ == "ResnetBlock2D":
            shapes[name] = {"channels": _round_channels(m.conv1.out_channels, ratio, m.norm2.num_groups)}
        else:
            shapes[name] = {"heads": [_kept_heads(a.heads, ratio) for a in _attentions(m)]}
    return shapes


# ------------------------------------------------------------------------------------------------ pruning


def _prune_resnet(block, keep: int) -> None:
    """torch-pruning's dependency graph finds what conv1's output channels feed (time-embedding projection through
    the broadcast add, norm2, conv2's input) and prunes them as one group."""
    import torch_pruning as tp

    drop = block.conv1.out_channels - keep
    if drop <= 0:
        return
    norms = block.conv1.weight.detach().flatten(1).norm(dim=1)  # L2 norm of each conv1 filter
    idxs = norms.argsort()[:drop].tolist()
    x = torch.zeros(1, block.conv1.in_channels, 8, 8)
    temb = torch.zeros(1, block.time_emb_proj.in_features) if block.time_emb_proj is not None else None
    graph = tp.DependencyGraph().build_dependency(block, example_inputs=(x, temb))
    group = graph.get_pruning_group(block.conv1, tp.prune_conv_out_channels, idxs=idxs)
    group.prune()


def _prune_heads(attn, keep: int) -> None:
    """Hand-written: torch-pruning 1.6.1 does not trace diffusers' attention processor (heads reshaped out of the
    projections, then a fused scaled_dot_product_attention), so its graph leaves q/k/v/out ungrouped and prunes no
    head. A head is kept by the L2 norm of its query, key, value rows and output columns."""
    heads = attn.heads
    if keep >= heads:
        return
    dim = attn.to_q.out_features // heads
    score = sum(lin.weight.detach().view(heads, dim, -1).pow(2).sum((1, 2)) for lin in (attn.to_q, attn.to_k, attn.to_v))
    score = score + attn.to_out[0].weight.detach().view(-1, heads, dim).pow(2).sum((0, 2))
    kept = score.argsort(descending=True)[:keep].sort().values
    rows = (kept[:, None] * dim + torch.arange(dim)).flatten()
    for lin_name in ("to_q", "to_k", "to_v"):
        old = getattr(attn, lin_name)
        new = nn.Linear(old.in_features, len(rows), bias=old.bias is not None)
        new.weight.data.copy_(old.weight.data[rows])
        if old.bias is not None:
            new.bias.data.copy_(old.bias.data[rows])
        setattr(attn, lin_name, new)
    old = attn.to_out[0]
    new = nn.Linear(len(rows), old.out_features, bias=old.bias is not None)
    new.weight.data.copy_(old.weight.data[:, rows])
    if old.bias is not None:
        new.bias.data.copy_(old.bias.data)
    attn.to_out[0] = new
    attn.heads, attn.inner_dim = keep, len(rows)


def prune(unet, plan: dict[str, float]):
    """A pruned copy of `unet` (the teacher is left untouched) as a `PrunedUNet2DConditionModel`."""
    unknown = sorted(set(plan) - {c.name for c in candidates(unet)})
    if unknown:
        raise ValueError(f"not prunable candidate layers of this UNet: {unknown}")
    bad = {k: v for k, v in plan.items() if not 0 < float(v) <= 1}
    if bad:
        raise ValueError(f"keep ratios must lie in (0, 1], got {bad}")
    shapes = layer_shapes(unet, plan)
    work = copy.deepcopy(unet).eval()
    modules = dict(work.named_modules())
    for name, shape in shapes.items():
        if "channels" in shape:
            _prune_resnet(modules[name], shape["channels"])
        else:
            for attn, keep in zip(_attentions(modules[name]), shape["heads"]):
                _prune_heads(attn, keep)
    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_") and k != "pruned_layers"}
    previous = dict(getattr(unet.config, "pruned_layers", None) or {})
    pruned = PrunedUNet2DConditionModel(**config, pruned_layers={**previous, **shapes})
    pruned.load_state_dict(work.state_dict(), strict=True)
    return pruned.eval()


# ---------------------------------------------------------------------------------------- the model class


def _reshape(unet, pruned_layers: dict) -> None:
    """Build the narrower layers `pruned_layers` names (their weights come from the checkpoint)."""
    modules = dict(unet.named_modules())
    for name, shape in pruned_layers.items():
        m = modules.get(name)
        if m is None:
            raise ValueError(f"pruned layer {name!r} is not a module of this UNet")
        if "channels" in shape:
            c = int(shape["channels"])
            m.conv1 = nn.Conv2d(m.conv1.in_channels, c, m.conv1.kernel_size, padding=m.conv1.padding)
            if m.time_emb_proj is not None:
                m.time_emb_proj = nn.Linear(m.time_emb_proj.in_features, c)
            m.norm2 = nn.GroupNorm(m.norm2.num_groups, c, eps=m.norm2.eps, affine=m.norm2.affine)
            m.conv2 = nn.Conv2d(c, m.conv2.out_channels, m.conv2.kernel_size, padding=m.conv2.padding)
        else:
            for attn, heads in zip(_attentions(m), shape["heads"]):
                dim = attn.to_q.out_features // attn.heads
                inner = int(heads) * dim
                for lin_name in ("to_q", "to_k", "to_v"):
                    old = getattr(attn, lin_name)
                    setattr(attn, lin_name, nn.Linear(old.in_features, inner, bias=old.bias is not None))
                old = attn.to_out[0]
                attn.to_out[0] = nn.Linear(inner, old.out_features, bias=old.bias is not None)
                attn.heads, attn.inner_dim = int(heads), inner


def _pruned_class():
    from diffusers import UNet2DConditionModel

    class PrunedUNet2DConditionModel(UNet2DConditionModel):
        """A UNet2DConditionModel whose listed ResNet blocks / attention blocks are narrower (see module doc)."""

        def __init__(self, *args, pruned_layers: dict | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.register_to_config(pruned_layers=dict(pruned_layers or {}))
            _reshape(self, dict(pruned_layers or {}))

    # diffusers reads a model's config keys from its __init__ signature: the base class's plus `pruned_layers`.
    base = inspect.signature(UNet2DConditionModel.__init__)
    params = [p for p in base.parameters.values()]
    params.append(inspect.Parameter("pruned_layers", inspect.Parameter.KEYWORD_ONLY, default=None))
    PrunedUNet2DConditionModel.__init__.__signature__ = base.replace(parameters=params)
    PrunedUNet2DConditionModel.__module__ = __name__
    PrunedUNet2DConditionModel.__qualname__ = "PrunedUNet2DConditionModel"
    return PrunedUNet2DConditionModel


PrunedUNet2DConditionModel = _pruned_class()


def load_unet(path):
    """A UNet folder written by `save_pretrained`: pruned (our class) or a plain diffusers one."""
    import json
    from pathlib import Path

    from diffusers import UNet2DConditionModel

    cls = PrunedUNet2DConditionModel if "pruned_layers" in json.loads((Path(path) / "config.json").read_text()) \
        else UNet2DConditionModel
    return cls.from_pretrained(path).eval()


# ------------------------------------------------------------------------------------ parameter accounting


def param_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def planned_params(unet, plan: dict[str, float]) -> int:
    """Parameter count `prune(unet, plan)` will have, computed from shapes alone (no pruning)."""
    modules = dict(unet.named_modules())
    removed = 0
    for name, shape in layer_shapes(unet, plan).items():
        m = modules[name]
        if "channels" in shape:
            drop = m.conv1.out_channels - shape["channels"]
            per = m.conv1.in_channels * m.conv1.weight[0, 0].numel() + 1 + 2  # conv1 filter + bias, norm2 w + b
            per += (m.time_emb_proj.in_features + 1) if m.time_emb_proj is not None else 0
            per += m.conv2.out_channels * m.conv2.weight[0, 0].numel()
            removed += drop * per
        else:
            for attn, keep in zip(_attentions(m), shape["heads"]):
                dim = attn.to_q.out_features // attn.heads
                per = sum(lin.in_features + (lin.bias is not None) for lin in (attn.to_q, attn.to_k, attn.to_v))
                per += attn.to_out[0].out_features
                removed += (attn.heads - keep) * dim * per
    return param_count(unet) - removed


def uniform_plan(unet, target_params: int, names: list[str] | None = None) -> dict[str, float]:
    """One keep ratio for every candidate, the one whose pruned UNet is closest to `target_params`."""
    names = names or [c.name for c in candidates(unet)]
    best = None
    for i in range(1, 101):  # rounding to groups/heads makes the count a step function: scan, don't bisect
        plan = {n: i / 100 for n in names}
        gap = abs(planned_params(unet, plan) - target_params)
        if best is None or gap < best[0]:
            best = (gap, plan)
    return best[1]


def tiered_plan(scores: dict[str, float], ratios: tuple[float, float, float] = TIER_RATIOS) -> dict[str, float]:
    """Least significant third of the candidates keeps ratios[0], the next third ratios[1], the rest ratios[2]."""
    if not scores:
        raise ValueError("no significance scores: score at least one candidate layer")
    order = sorted(scores, key=lambda n: (scores[n], n))
    n = len(order)
    return {name: ratios[min(2, (3 * i) // n)] for i, name in enumerate(order)}


# --------------------------------------------------------------------------------------------- significance


def latent_stats(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise mean and std over the generated samples."""
    return latents.mean(0), latents.std(0)


def significance(base: tuple[torch.Tensor, torch.Tensor], pruned_latents: torch.Tensor) -> float:
    """||mean_base - mean_pruned|| + ||std_base - std_pruned|| (Hybrid SD's score of one candidate)."""
    mean, std = latent_stats(pruned_latents)
    return float((base[0] - mean).norm() + (base[1] - std).norm())


def score_candidate(pipe, name: str, prompts: list[str], seeds: list[int], *, steps: int, guidance_scale: float,
                    base_latents: torch.Tensor | None = None) -> dict:
    """Prune candidate `name` of the pipeline's UNet to PROBE_RATIO, generate latents for the fixed prompts and
    seeds, and score the change of their statistics against the unpruned UNet's."""
    from distillery.papers.hybrid_sd.sampler import generate_latents

    if base_latents is None:
        base_latents = generate_latents(pipe, pipe.unet, prompts, seeds, steps=steps, guidance_scale=guidance_scale)
    pruned = prune(pipe.unet, {name: PROBE_RATIO})
    latents = generate_latents(pipe, pruned, prompts, seeds, steps=steps, guidance_scale=guidance_scale)
    return {"layer": name, "score": significance(latent_stats(base_latents), latents),
            "params_removed": param_count(pipe.unet) - param_count(pruned)}
