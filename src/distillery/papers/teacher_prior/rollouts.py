"""The teacher's rollouts: what the motion prior treats as real motion and what scales the auxiliary targets.

`collect` runs the deterministic teacher on training terrain and stores every transition's proprioception as the
student sees it (noisy), the next one, the auxiliary targets, and per episode its length, return, distance and
whether it fell (`rollouts.npz` + `manifest.json`). `validate` is the Great Expectations suite over them: ranges,
episode lengths, no NaN; a failure names every broken expectation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from distillery.data.arrays import read_array_set, write_manifest, write_npz
from distillery.papers.teacher_prior.env import AUX, PROPRIO, TerrainConfig, TerrainVecEnv
from distillery.papers.teacher_prior.train import TRAIN_SEEDS

ARRAYS = ("proprio", "proprio_next", "aux", "episode", "ep_length", "ep_return", "ep_distance", "ep_fell")


def collect(teacher, cfg: TerrainConfig, episodes: int, num_envs: int = 8, seed: int = 0) -> dict:
    """At least `episodes` whole episodes of the teacher (transitions of unfinished ones are dropped)."""
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    env = TerrainVecEnv(cfg, num_envs, seed=seed, terrain_seeds=TRAIN_SEEDS)
    obs = env.reset()
    open_eps: list[list] = [[] for _ in range(num_envs)]
    out = {k: [] for k in ARRAYS}
    n_done = 0
    while n_done < episodes:
        nxt, _, _, _, info = env.step(teacher.act(obs["teacher"]))
        for i in range(num_envs):
            p_next = info["final"][i]["proprio"] if info["final"][i] is not None else nxt["proprio"][i]
            open_eps[i].append((obs["proprio"][i], p_next, obs["aux"][i]))
            if info["final"][i] is not None:
                steps = open_eps[i]
                out["proprio"] += [s[0] for s in steps]
                out["proprio_next"] += [s[1] for s in steps]
                out["aux"] += [s[2] for s in steps]
                out["episode"] += [n_done] * len(steps)
                out["ep_length"].append(len(steps))
                out["ep_return"].append(info["episode_return"][i])
                out["ep_distance"].append(info["distance"][i])
                out["ep_fell"].append(bool(info["fell"][i]))
                open_eps[i] = []
                n_done += 1
        obs = nxt
    arrays = {k: np.asarray(v) for k, v in out.items()}
    for k in ("proprio", "proprio_next", "aux"):
        arrays[k] = arrays[k].astype(np.float32)
    return arrays


def save(arrays: dict, out: Path, cfg: TerrainConfig, **meta) -> dict:
    digest = write_npz(out / "rollouts.npz", arrays)
    return write_manifest(out, {"transitions": int(len(arrays["proprio"])), "episodes": int(len(arrays["ep_length"])),
                                "terrain_config": cfg.as_dict(), "content_sha256": digest, **meta})


def load(path: Path) -> tuple[dict, dict]:
    return read_array_set(path, "rollouts.npz", "teacher rollouts")


def frames(arrays: dict):
    """Pandas frames the suite checks: one row per transition (feature ranges, NaN) and one per episode."""
    import pandas as pd

    p, pn, aux = arrays["proprio"], arrays["proprio_next"], arrays["aux"]
    steps = pd.DataFrame({"proprio_dim": [p.shape[1]] * len(p), "aux_dim": [aux.shape[1]] * len(p),
                          "has_nan": ~(np.isfinite(p).all(1) & np.isfinite(pn).all(1) & np.isfinite(aux).all(1)),
                          "proprio_absmax": np.nan_to_num(np.abs(np.concatenate([p, pn], 1)).max(1), nan=np.inf),
                          "torso_height": aux[:, 2], "friction": aux[:, 5], "mass": aux[:, 6], "motor": aux[:, 7]})
    episodes = pd.DataFrame({"length": arrays["ep_length"], "return": arrays["ep_return"],
                             "steps_present": np.bincount(arrays["episode"], minlength=len(arrays["ep_length"])),
                             "fell": arrays["ep_fell"]})
    return {"transitions": steps, "episodes": episodes}


def validate(arrays: dict, cfg: TerrainConfig, report_html: Path, *, min_length: int, proprio_bound: float = 50.0):
    """The GX suite; returns platform.validation's ValidationResult (and writes its HTML report)."""
    import great_expectations as gx

    from distillery.platform.validation import run_suite, write_report

    E = gx.expectations
    f = frames(arrays)
    expectations = {
        "transitions": [
            E.ExpectTableRowCountToBeBetween(min_value=1),
            E.ExpectColumnValuesToBeInSet(column="proprio_dim", value_set=[PROPRIO]),
            E.ExpectColumnValuesToBeInSet(column="aux_dim", value_set=[AUX]),
            E.ExpectColumnValuesToBeInSet(column="has_nan", value_set=[False]),
            E.ExpectColumnValuesToBeBetween(column="proprio_absmax", min_value=0.0, max_value=proprio_bound),
            E.ExpectColumnValuesToBeBetween(column="torso_height", min_value=0.0, max_value=2.5),
            *[E.ExpectColumnValuesToBeBetween(column=name, min_value=lo - 1e-6, max_value=hi + 1e-6)
              for name, (lo, hi) in (("friction", cfg.friction), ("mass", cfg.mass), ("motor", cfg.motor))],
        ],
        "episodes": [
            E.ExpectTableRowCountToBeBetween(min_value=1),
            E.ExpectColumnValuesToBeBetween(column="length", min_value=min_length, max_value=cfg.episode_steps),
            E.ExpectColumnPairValuesToBeEqual(column_A="length", column_B="steps_present"),
            E.ExpectColumnValuesToNotBeNull(column="return"),
        ],
    }
    result = run_suite("teacher_rollouts", f, expectations)
    result.statistics.update(episodes=len(f["episodes"]), mean_length=round(float(f["episodes"]["length"].mean()), 1))
    write_report(result, Path(report_html), f"Data validation: teacher rollouts ({len(f['episodes'])} episodes)")
    return result
