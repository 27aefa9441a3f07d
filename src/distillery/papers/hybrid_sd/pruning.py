"""Significance-scored, tiered structural pruning of a Stable Diffusion UNet (Hybrid SD), plus BK-SDM's block removal.

Block removal (BK-SDM style, whatever the scores): the mid block (its two ResNet blocks and its attention block) is
dropped whole, as in BK-SDM-Small, so the deepest down block feeds the first up block directly (diffusers'
`mid_block_type: null`); and the final up stage loses its last ResNet + attention pair, as BK-SDM removes one pair
per up stage. That pair read the skip from conv_in, which then goes unused: the UNet hands an up block as many skips
as it has ResNet blocks, last first, so the final stage is the one whose pair can go without re-routing a skip
(`pruned_layers` records it as removed). The KD then matches features only at the blocks the student still has.

Candidate layers are the remaining ResNet blocks and attention (Transformer2D) blocks. A ResNet block loses
inner channels: the output channels of conv1 and of the time-embedding projection, the channels of norm2 and the
input channels of conv2, keeping the conv1 filters with the largest L2 norm, rounded to a multiple of norm2's
group count so the GroupNorm keeps its groups. An attention block loses heads of its self- and cross-attention
(query/key/value rows and output-projection columns of each removed head) and, at the same keep ratio, hidden
units of each transformer block's feed-forward (GEGLU: a unit is a pair of rows of the projection, its value and
its gate, and one column of the output layer). Block inputs and outputs keep their width, so every skip
connection stays as it was.

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
REMOVE_BLOCKS = True  # BK-SDM style: the mid block and the final up stage's last pair go, whatever the scores
MID = "mid_block"


@dataclass(frozen=True)
class Candidate:
    name: str  # module path in the UNet
    kind: str  # "resnet" or "attention"


def removed_blocks(unet) -> list[str]:
    """What block removal takes out of this UNet: its mid block, and the final up stage's last ResNet block with
    its attention block (if that stage has more than one)."""
    out = [MID] if unet.mid_block is not None else []
    i, last = len(unet.up_blocks) - 1, unet.up_blocks[-1]
    if len(last.resnets) > 1:
        j = len(last.resnets) - 1
        out.append(f"up_blocks.{i}.resnets.{j}")
        if getattr(last, "attentions", None):
            out.append(f"up_blocks.{i}.attentions.{j}")
    return out


def _inside(name: str, blocks: list[str]) -> bool:
    return any(name == b or name.startswith(b + ".") for b in blocks)


def candidates(unet, *, remove_blocks: bool = REMOVE_BLOCKS) -> list[Candidate]:
    """Every ResNet block and attention block of the UNet, in module order (less the removed blocks' layers when
    `remove_blocks`: what is removed anyway needs no score)."""
    gone = removed_blocks(unet) if remove_blocks else []
    out = []
    for name, module in unet.named_modules():
        kind = {"ResnetBlock2D": "resnet", "Transformer2DModel": "attention"}.get(type(module).__name__)
        if kind and not _inside(name, gone):
            out.append(Candidate(name, kind))
    return out


def _attentions(block) -> list:
    return [m for m in block.modules() if type(m).__name__ == "Attention"]


def _feed_forwards(block) -> list:
    return [m for m in block.modules() if type(m).__name__ == "FeedForward"]


def _ff_units(ff) -> int:
    return ff.net[-1].in_features  # hidden units (GEGLU's projection has two rows per unit)


def _round_channels(channels: int, ratio: float, groups: int) -> int:
    """Kept channels: ratio of the width, rounded to a multiple of the GroupNorm group count (at least one group)."""
    return int(max(groups, min(channels, round(channels * ratio / groups) * groups)))


def _kept_units(units: int, ratio: float) -> int:
    """Kept heads or feed-forward units: ratio of them, rounded, at least one."""
    return int(max(1, min(units, round(units * ratio))))


def layer_shapes(unet, plan: dict[str, float]) -> dict[str, dict]:
    """{candidate name: kept inner channels or heads} for a plan of keep ratios (what `pruned_layers` records)."""
    modules = dict(unet.named_modules())
    shapes = {}
    for name, ratio in plan.items():
        m = modules[name]
        if type(m).__name__ == "ResnetBlock2D":
            shapes[name] = {"channels": _round_channels(m.conv1.out_channels, ratio, m.norm2.num_groups)}
        else:
            shapes[name] = {"heads": [_kept_units(a.heads, ratio) for a in _attentions(m)],
                            "ff": [_kept_units(_ff_units(f), ratio) for f in _feed_forwards(m)]}
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


def _prune_ff(ff, keep: int) -> None:
    """torch-pruning groups the projection's value and gate rows of a unit (it traces GEGLU's chunk) with the
    output layer's column; a unit is kept by the L2 norm of those rows and that column."""
    import torch_pruning as tp

    units, proj, out = _ff_units(ff), ff.net[0].proj, ff.net[-1]
    if keep >= units:
        return
    rows = proj.weight.detach().view(-1, units, proj.in_features).pow(2).sum((0, 2))  # value + gate rows of a unit
    score = rows + out.weight.detach().pow(2).sum(0)
    idxs = score.argsort()[:units - keep].tolist()
    graph = tp.DependencyGraph().build_dependency(ff, example_inputs=torch.zeros(1, 2, proj.in_features))
    graph.get_pruning_group(out, tp.prune_linear_in_channels, idxs=idxs).prune()


def _build_config(unet, remove_blocks: bool) -> dict:
    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_") and k != "pruned_layers"}
    if remove_blocks:
        config["mid_block_type"] = None
    return config


def _all_shapes(unet, plan: dict[str, float], remove_blocks: bool) -> dict[str, dict]:
    """`pruned_layers` of the result: what `unet` already had (less the removed blocks'), this plan's shapes, and
    the removed ResNet/attention blocks of the up path (the mid block is the config's)."""
    previous = dict(getattr(unet.config, "pruned_layers", None) or {})
    gone = removed_blocks(unet) if remove_blocks else []
    previous = {k: v for k, v in previous.items() if not _inside(k, gone)}
    return {**previous, **layer_shapes(unet, plan), **{b: {"removed": True} for b in gone if b != MID}}


def _check_plan(unet, plan: dict[str, float], remove_blocks: bool) -> None:
    unknown = sorted(set(plan) - {c.name for c in candidates(unet, remove_blocks=remove_blocks)})
    if unknown:
        raise ValueError(f"not prunable candidate layers of this UNet: {unknown}")
    bad = {k: v for k, v in plan.items() if not 0 < float(v) <= 1}
    if bad:
        raise ValueError(f"keep ratios must lie in (0, 1], got {bad}")


def prune(unet, plan: dict[str, float], *, remove_blocks: bool = REMOVE_BLOCKS):
    """A pruned copy of `unet` (the teacher is left untouched) as a `PrunedUNet2DConditionModel`; without the
    `removed_blocks` unless `remove_blocks` is False (as when one candidate is probed for its score)."""
    _check_plan(unet, plan, remove_blocks)
    shapes = layer_shapes(unet, plan)
    work = copy.deepcopy(unet).eval()
    modules = dict(work.named_modules())
    for name, shape in shapes.items():
        if "channels" in shape:
            _prune_resnet(modules[name], shape["channels"])
        else:
            for attn, keep in zip(_attentions(modules[name]), shape["heads"]):
                _prune_heads(attn, keep)
            for ff, keep in zip(_feed_forwards(modules[name]), shape.get("ff", [])):
                _prune_ff(ff, keep)
    pruned = PrunedUNet2DConditionModel(**_build_config(unet, remove_blocks),
                                        pruned_layers=_all_shapes(unet, plan, remove_blocks))
    gone = removed_blocks(unet) if remove_blocks else []
    pruned.load_state_dict({k: v for k, v in work.state_dict().items() if not _inside(k, gone)}, strict=True)
    return pruned.eval()


# ---------------------------------------------------------------------------------------- the model class


def _reshape(unet, pruned_layers: dict) -> None:
    """Build the narrower layers `pruned_layers` names (their weights come from the checkpoint)."""
    modules = dict(unet.named_modules())
    for name in pruned_layers:
        if name not in modules:
            raise ValueError(f"pruned layer {name!r} is not a module of this UNet")
    for name, shape in pruned_layers.items():
        m = modules[name]
        if shape.get("removed"):
            continue  # deleted below, once every name has been resolved
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
            for ff, units in zip(_feed_forwards(m), shape.get("ff", [])):  # absent in UNets saved before
                proj, out = ff.net[0].proj, ff.net[-1]
                rows = proj.out_features // out.in_features * int(units)  # GEGLU: value and gate rows
                ff.net[0].proj = nn.Linear(proj.in_features, rows, bias=proj.bias is not None)
                ff.net[-1] = nn.Linear(int(units), out.out_features, bias=out.bias is not None)
    # Removed blocks leave their ModuleList, highest index first so the other indices hold.
    removed = sorted((n for n, shape in pruned_layers.items() if shape.get("removed")),
                     key=lambda n: int(n.rsplit(".", 1)[1]), reverse=True)
    for name in removed:
        parent, index = name.rsplit(".", 1)
        del modules[parent][int(index)]


def _pruned_class():
    from diffusers import UNet2DConditionModel

    class PrunedUNet2DConditionModel(UNet2DConditionModel):
        """A UNet2DConditionModel whose listed ResNet blocks / attention blocks are narrower or removed (see module
        doc); a removed mid block is the base class's own `mid_block_type=None`."""

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


def planned_params(unet, plan: dict[str, float], *, remove_blocks: bool = REMOVE_BLOCKS) -> int:
    """Parameter count `prune(unet, plan)` will have: the pruned architecture built on the meta device (shapes
    only, no weights, no pruning)."""
    _check_plan(unet, plan, remove_blocks)
    with torch.device("meta"):
        model = PrunedUNet2DConditionModel(**_build_config(unet, remove_blocks),
                                           pruned_layers=_all_shapes(unet, plan, remove_blocks))
    return param_count(model)


def uniform_plan(unet, target_params: int, names: list[str] | None = None, *,
                 remove_blocks: bool = REMOVE_BLOCKS) -> dict[str, float]:
    """One keep ratio for every candidate, the one whose pruned UNet (with the same blocks removed) is closest to
    `target_params`."""
    names = names or [c.name for c in candidates(unet, remove_blocks=remove_blocks)]
    best = None
    for i in range(1, 101):  # rounding to groups/heads makes the count a step function: scan, don't bisect
        plan = {n: i / 100 for n in names}
        gap = abs(planned_params(unet, plan, remove_blocks=remove_blocks) - target_params)
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
    pruned = prune(pipe.unet, {name: PROBE_RATIO}, remove_blocks=False)  # this candidate alone
    latents = generate_latents(pipe, pruned, prompts, seeds, steps=steps, guidance_scale=guidance_scale)
    return {"layer": name, "score": significance(latent_stats(base_latents), latents),
            "params_removed": param_count(pipe.unet) - param_count(pruned)}
