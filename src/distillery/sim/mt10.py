"""Meta-World MT10: the ten tasks, their language instructions, environments with a chosen task variation, and
the scripted expert policies metaworld ships. One small module between the project and metaworld."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

INSTRUCTIONS = {
    "reach-v3": "reach the red goal position",
    "push-v3": "push the puck to the goal",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "door-open-v3": "open the door",
    "drawer-open-v3": "open the drawer",
    "drawer-close-v3": "close the drawer",
    "button-press-topdown-v3": "press the button from the top",
    "peg-insert-side-v3": "insert the peg into the hole from the side",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
}
TASKS = tuple(INSTRUCTIONS)
OBS_DIM, ACT_DIM = 39, 4


@lru_cache(maxsize=4)
def _benchmark(seed: int = 0):
    import metaworld

    return metaworld.MT10(seed=seed)


def check_task(name: str) -> str:
    if name not in INSTRUCTIONS:
        raise ValueError(f"unknown task {name!r}; MT10 tasks are {list(TASKS)}")
    return name


def make_env(name: str, variation: int, render: bool = False, benchmark_seed: int = 0):
    """The task's environment with one of its 50 fixed variations (object and goal positions). MT10 draws the 50
    variations from `benchmark_seed`: the demonstrations use seed 0; another seed gives unseen variations."""
    bench = _benchmark(benchmark_seed)
    check_task(name)
    env = bench.train_classes[name](render_mode="rgb_array" if render else None)
    variations = [t for t in bench.train_tasks if t.env_name == name]
    env.set_task(variations[variation % len(variations)])
    return env


def expert(name: str):
    """The scripted expert of a task (metaworld.policies): `expert(name).get_action(obs)`."""
    from metaworld.policies import ENV_POLICY_MAP

    return ENV_POLICY_MAP[check_task(name)]()


def max_steps(env) -> int:
    return int(getattr(env, "max_path_length", 500))


def clip_action(action: np.ndarray) -> np.ndarray:
    return np.clip(np.asarray(action, dtype=np.float32), -1.0, 1.0)
