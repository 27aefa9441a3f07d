"""Demonstration datasets: Meta-World MT10 episodes rolled out by the scripted experts, only successful ones kept,
each with its task's language instruction; and their Great Expectations suite.

Artifact format (a folder):
  demos.npz      obs (S, 39) float32, actions (S, 4) float32, episode_start / episode_length / episode_task
                 (E,) int64, episode_success (E,) bool — S steps of E episodes stored back to back
  manifest.json  tasks (index -> name), instructions, episodes per task, content_sha256
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from distillery.platform.validation import ValidationResult, run_suite, write_report
from distillery.sim import mt10


@dataclass
class Demos:
    obs: np.ndarray
    actions: np.ndarray
    start: np.ndarray
    length: np.ndarray
    task: np.ndarray
    success: np.ndarray
    tasks: list[str]
    instructions: list[str]
    manifest: dict

    def episode(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s, n = int(self.start[i]), int(self.length[i])
        return self.obs[s:s + n], self.actions[s:s + n]


def collect_mt10_demos(out_dir: Path, *, episodes_per_task: int, seed: int = 0, tasks: tuple[str, ...] = mt10.TASKS,
                       max_attempts_factor: int = 3, progress: bool = True) -> dict:
    """Roll out each task's scripted expert on successive task variations until `episodes_per_task` episodes
    succeed (an episode ends at the first successful step). Writes the artifact; returns the manifest."""
    from tqdm.auto import tqdm

    if episodes_per_task < 1:
        raise ValueError(f"episodes_per_task must be >= 1, got {episodes_per_task}")
    for name in tasks:
        mt10.check_task(name)
    obs_all, act_all, start, length, task_idx, success = [], [], [], [], [], []
    failed = {}
    offset = 0
    bar = tqdm(total=episodes_per_task * len(tasks), desc="demos", disable=not progress, mininterval=2.0)
    for t, name in enumerate(tasks):
        kept, attempts = 0, 0
        policy = mt10.expert(name)
        while kept < episodes_per_task:
            if attempts >= max_attempts_factor * episodes_per_task:
                raise RuntimeError(f"the scripted expert of {name} succeeded {kept} times in {attempts} attempts; "
                                   f"cannot collect {episodes_per_task} successful episodes")
            env = mt10.make_env(name, variation=seed * 1000 + attempts)
            obs, _ = env.reset(seed=seed * 100_003 + attempts)
            attempts += 1
            ep_obs, ep_act, ok = [], [], False
            for _ in range(mt10.max_steps(env)):
                action = mt10.clip_action(policy.get_action(obs))
                ep_obs.append(np.asarray(obs, np.float32))
                ep_act.append(action)
                obs, _, terminated, truncated, info = env.step(action)
                if info.get("success"):
                    ok = True
                    break
                if terminated or truncated:
                    break
            env.close()
            if not ok:
                failed[name] = failed.get(name, 0) + 1
                continue
            obs_all += ep_obs
            act_all += ep_act
            start.append(offset)
            length.append(len(ep_obs))
            task_idx.append(t)
            success.append(True)
            offset += len(ep_obs)
            kept += 1
            bar.update()
    bar.close()
    arrays = dict(obs=np.stack(obs_all), actions=np.stack(act_all), episode_start=np.array(start, np.int64),
                  episode_length=np.array(length, np.int64), episode_task=np.array(task_idx, np.int64),
                  episode_success=np.array(success, bool))
    return write_demos(Path(out_dir), arrays, list(tasks), extra={"source": "metaworld MT10 scripted experts",
                                                                  "seed": seed, "expert_failures": failed})


def write_demos(out: Path, arrays: dict, tasks: list[str], extra: dict | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "demos.npz", **arrays)
    digest = hashlib.sha256()
    for key in sorted(arrays):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(arrays[key]).tobytes())
    counts = np.bincount(arrays["episode_task"], minlength=len(tasks))
    manifest = {"name": "mt10-demos", "tasks": tasks, "instructions": [mt10.INSTRUCTIONS.get(t, t) for t in tasks],
                "episodes": int(len(arrays["episode_start"])), "steps": int(len(arrays["obs"])),
                "episodes_per_task": {t: int(c) for t, c in zip(tasks, counts)},
                "content_sha256": digest.hexdigest(), **(extra or {})}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def load_demos(path: Path) -> Demos:
    path = Path(path)
    if not (path / "manifest.json").exists() or not (path / "demos.npz").exists():
        raise FileNotFoundError(f"{path} is not a demonstration dataset (needs manifest.json and demos.npz)")
    manifest = json.loads((path / "manifest.json").read_text())
    with np.load(path / "demos.npz", allow_pickle=False) as z:
        a = {k: z[k] for k in z.files}
    return Demos(a["obs"], a["actions"], a["episode_start"], a["episode_length"], a["episode_task"],
                 a["episode_success"], manifest["tasks"], manifest["instructions"], manifest)


# ------------------------------------------------------------------------------------------- validation


def demo_stats(path: Path) -> dict[str, pd.DataFrame]:
    """Per-episode statistics and per-task counts, computed without trusting shapes (a corrupt file must still be
    described)."""
    d = load_demos(path)
    rows = []
    for i in range(len(d.start)):
        s, n = int(d.start[i]), int(d.length[i])
        o, a = d.obs[s:s + n], d.actions[s:s + n]
        rows.append({"task": d.tasks[int(d.task[i])] if 0 <= int(d.task[i]) < len(d.tasks) else f"#{int(d.task[i])}",
                     "length": n, "steps_present": len(o), "success": bool(d.success[i]),
                     "obs_dim": int(o.shape[1]) if o.ndim == 2 else -1,
                     "act_dim": int(a.shape[1]) if a.ndim == 2 else -1,
                     "has_nan": bool(np.isnan(o).any() or np.isnan(a).any()),
                     "obs_min": float(np.nanmin(o)) if o.size else 0.0, "obs_max": float(np.nanmax(o)) if o.size else 0.0,
                     "act_min": float(np.nanmin(a)) if a.size else 0.0, "act_max": float(np.nanmax(a)) if a.size else 0.0})
    episodes = pd.DataFrame(rows)
    tasks = pd.DataFrame({"task": list(mt10.TASKS),
                          "episodes": [int((episodes["task"] == t).sum()) if len(episodes) else 0 for t in mt10.TASKS]})
    return {"episodes": episodes, "tasks": tasks}


def validate_demos(path: Path, report_html: Path, *, min_episodes_per_task: int = 1, min_length: int = 5,
                   max_length: int = 500, obs_bound: float = 10.0) -> ValidationResult:
    """Shapes, observation/action ranges, episode lengths, only successful episodes, all ten MT10 tasks present."""
    import great_expectations as gx

    E = gx.expectations
    frames = demo_stats(path)
    expectations = {
        "episodes": [
            E.ExpectTableRowCountToBeBetween(min_value=1),
            E.ExpectColumnValuesToBeInSet(column="task", value_set=list(mt10.TASKS)),
            E.ExpectColumnValuesToBeInSet(column="success", value_set=[True]),
            E.ExpectColumnValuesToBeBetween(column="length", min_value=min_length, max_value=max_length),
            E.ExpectColumnPairValuesToBeEqual(column_A="length", column_B="steps_present"),
            E.ExpectColumnValuesToBeInSet(column="obs_dim", value_set=[mt10.OBS_DIM]),
            E.ExpectColumnValuesToBeInSet(column="act_dim", value_set=[mt10.ACT_DIM]),
            E.ExpectColumnValuesToBeInSet(column="has_nan", value_set=[False]),
            E.ExpectColumnValuesToBeBetween(column="obs_min", min_value=-obs_bound, max_value=obs_bound),
            E.ExpectColumnValuesToBeBetween(column="obs_max", min_value=-obs_bound, max_value=obs_bound),
            E.ExpectColumnValuesToBeBetween(column="act_min", min_value=-1.0, max_value=1.0),
            E.ExpectColumnValuesToBeBetween(column="act_max", min_value=-1.0, max_value=1.0),
        ],
        "tasks": [
            E.ExpectTableRowCountToEqual(value=len(mt10.TASKS)),
            E.ExpectColumnValuesToBeBetween(column="episodes", min_value=min_episodes_per_task),
        ],
    }
    result = run_suite("mt10_demos", frames, expectations)
    result.statistics.update(episodes=len(frames["episodes"]),
                             mean_length=round(float(frames["episodes"]["length"].mean()), 1)
                             if len(frames["episodes"]) else 0.0)
    write_report(result, Path(report_html), f"Data validation: MT10 demonstrations ({len(frames['episodes'])} episodes)")
    return result
