"""SCott's evaluation table: the teacher at many steps and each student at few, on the same held-out prompts
and seeds — Frechet distance, conditional accuracy, latency and UNet evaluations per image, one sample grid per row."""

from __future__ import annotations

from pathlib import Path

import numpy as np


# What each table row reports (intervals are bootstrap 95%; latency_s is one image at batch 1).
ROW_METRICS = ("fd", "fd_ci_low", "fd_ci_high", "kid", "cond_acc", "cond_acc_ci_low", "cond_acc_ci_high", "latency_s",
               "latency_batch_s", "unet_evals_per_image")


def row_key(model: str, steps: int) -> str:
    """A metric-name prefix (MLflow and KFP both accept it): `scott_adv_2step`."""
    return f"{model.replace('-', '_')}_{steps}step"


def evaluation_table(models: dict[str, tuple[Path, float]], steps: dict[str, list[int]], holdout, feature_net, *,
                     num_per_class: int, seed: int = 0, progress=None) -> tuple[list[dict], dict[str, np.ndarray]]:
    """`models`: name -> (pipeline folder, guidance scale to sample with); `steps`: name -> step counts.
    Returns the rows (model, steps and `ROW_METRICS`) and a grid per row."""
    from diffusers import StableDiffusionPipeline

    from distillery.models.image_eval import evaluate_text_to_image

    rows, grids = [], {}
    for name, (folder, guidance) in models.items():
        pipe = StableDiffusionPipeline.from_pretrained(folder, use_safetensors=True)
        for k in steps[name]:
            result = evaluate_text_to_image(pipe, holdout, feature_net, num_per_class=num_per_class, steps=k,
                                            guidance_scale=guidance, seed=seed)
            grids[row_key(name, k)] = result.pop("grid")
            rows.append({"model": name, "steps": k, **{m: float(result[m]) for m in ROW_METRICS}})
            if progress:
                progress(rows[-1])
    return rows, grids


def markdown(rows: list[dict]) -> str:
    """The table, with 95% intervals where the rows have them (latency: one image at batch 1)."""
    def ci(r: dict, m: str, fmt: str) -> str:
        return f" [{r[m + '_ci_low']:{fmt}}, {r[m + '_ci_high']:{fmt}}]" if m + "_ci_low" in r else ""

    lines = ["| model | steps | FD ↓ [95% CI] | cond. acc ↑ [95% CI] | latency / image (s) | UNet evals / image |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['steps']} | {r['fd']:.2f}{ci(r, 'fd', '.2f')} | {r['cond_acc']:.3f}"
              f"{ci(r, 'cond_acc', '.3f')} | {r['latency_s']:.4f} | {r['unet_evals_per_image']:.0f} |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict]):
    """FD against sampling steps, one line per model (log-x: 1 to 50 steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_fd, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = sorted((r for r in rows if r["model"] == name), key=lambda r: r["steps"])
        ax_fd.plot([r["steps"] for r in mine], [r["fd"] for r in mine], marker="o", label=name)
        ax_acc.plot([r["steps"] for r in mine], [r["cond_acc"] for r in mine], marker="o", label=name)
    for ax, title in ((ax_fd, "Frechet distance (lower is better)"), (ax_acc, "conditional accuracy")):
        ax.set_xscale("log")
        ax.set_xlabel("sampling steps")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax_fd.legend()
    fig.tight_layout()
    return fig


# The paper's comparison: the student at 2 steps against the teacher at 25.
HEADLINE_STUDENT_STEPS = 2
HEADLINE_TEACHER_STEPS = 25


def headline(rows: list[dict], candidate: str, teacher: str = "teacher",
             candidate_steps: int = HEADLINE_STUDENT_STEPS, teacher_steps: int = HEADLINE_TEACHER_STEPS,
             baseline: str = "cd-ode") -> dict:
    """The numbers the gate and the README look at: the candidate at `candidate_steps` against the teacher at
    `teacher_steps` and the CD-ODE baseline at the same steps. A missing row is an error, never another step
    count: a ratio against the teacher at 4 steps is not the ratio the gate's threshold was set for."""
    by = {(r["model"], r["steps"]): r for r in rows}
    for model, steps in ((candidate, candidate_steps), (teacher, teacher_steps)):
        if (model, steps) not in by:
            have = sorted(r["steps"] for r in rows if r["model"] == model)
            raise ValueError(f"the table has no {model} row at {steps} steps (it has {have or 'none'}); the headline "
                             f"compares the student at {candidate_steps} steps with the teacher at {teacher_steps}: "
                             f"include them in student_eval_steps / teacher_eval_steps")
    cand, ref = by[(candidate, candidate_steps)], by[(teacher, teacher_steps)]
    out = {"fd": cand["fd"], "cond_acc": cand["cond_acc"], "latency_s": cand["latency_s"],
           **{k: cand[k] for k in ("fd_ci_low", "fd_ci_high", "cond_acc_ci_low", "cond_acc_ci_high") if k in cand},
           "fd_ratio_vs_teacher": cand["fd"] / max(ref["fd"], 1e-12),
           "unet_eval_reduction": ref["unet_evals_per_image"] / max(cand["unet_evals_per_image"], 1e-12),
           "speedup_vs_teacher": ref["latency_s"] / max(cand["latency_s"], 1e-12)}
    base = by.get((baseline, candidate_steps))
    if base is not None:
        out["fd_ratio_vs_cd_ode"] = cand["fd"] / max(base["fd"], 1e-12)
    mine = sorted((r for r in rows if r["model"] == candidate), key=lambda r: r["steps"])
    # "improves or holds with more steps": no step count is more than 5% worse than the one before it
    out["monotone_in_steps"] = float(all(b["fd"] <= a["fd"] * 1.05 for a, b in zip(mine, mine[1:])))
    return out



def pick_winner(rows: list[dict], candidates: list[str], metric: str = "fd",
                steps: int = HEADLINE_STUDENT_STEPS) -> str:
    """The candidate with the lowest `metric` at `steps` (the gate's metric): the method a run releases, whichever
    it is. A candidate without a row at `steps` is an error, not a loss."""
    by = {(r["model"], r["steps"]): r for r in rows}
    missing = [c for c in candidates if (c, steps) not in by]
    if not candidates or missing:
        raise ValueError(f"cannot pick a release: no {steps}-step row for {missing or 'any candidate'}")
    return min(candidates, key=lambda c: by[(c, steps)][metric])
