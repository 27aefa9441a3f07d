"""Policy predictor: a saved MoDE (or dense) diffusion policy behind KServe's V1 and V2 protocols.

V1  POST /v1/models/NAME:predict
    {"instances": [{"task": "reach-v3" or its instruction, "observations": [[39 floats] x history], "seed"?: int}]}
    (each instance is sampled with its own seed, default 0: batching does not change an instance's actions)
    -> {"predictions": [{"actions": [[4 floats] x chunk], "task": "reach-v3"}]}
V2  POST /v2/models/NAME/infer: inputs "observations" FP32 [B, history, 39] and "task" BYTES [B]; parameter "seed"
    -> output "actions" FP32 [B, chunk, 4]
Observations of the wrong shape, NaN or infinite values and unknown tasks are answered with 400.
"""

from __future__ import annotations

import asyncio
import math
import threading
from pathlib import Path
from typing import Any

import kserve
import numpy as np
from kserve.errors import InvalidInput

from distillery.serving.server import register_kind

MAX_BATCH = 64


@register_kind("policy")
class PolicyModel(kserve.Model):
    def __init__(self, name: str, model_dir: Path):
        super().__init__(name)
        self.model_dir = Path(model_dir)
        self.policy = None
        self._lock = threading.Lock()

    def load(self) -> bool:
        import torch

        from distillery.papers.mode.policy import Policy

        torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
        self.policy = Policy(self.model_dir)  # expert cache, frozen into one graph: same actions, less work
        self.ready = True
        return True

    def _observations(self, value: Any) -> np.ndarray:
        cfg = self.policy.cfg
        want = (cfg.obs_history, cfg.obs_dim)
        try:
            obs = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise InvalidInput(f"'observations' must be numbers shaped {list(want)} (history x observation size)")
        if obs.shape[-2:] != want:
            raise InvalidInput(f"'observations' must be shaped {list(want)} per request (history x observation "
                               f"size), got {list(obs.shape[-2:]) if obs.ndim >= 2 else list(obs.shape)}")
        if not np.isfinite(obs).all():
            raise InvalidInput("'observations' contain NaN or infinite values")
        return obs.astype(np.float32)

    def _task(self, task: Any) -> str:
        if not isinstance(task, str):
            raise InvalidInput(f"'task' must be a string, got {task!r}")
        try:
            self.policy.task_index(task)
        except KeyError:
            raise InvalidInput(f"unknown task {task!r}; known tasks: {self.policy.tasks}") from None
        return task

    @staticmethod
    def _seed(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer() \
                or not math.isfinite(float(value)) or not 0 <= value < 2 ** 63:
            raise InvalidInput(f"'seed' must be a non-negative integer, got {value!r}")
        return int(value)

    def _act(self, obs: np.ndarray, tasks: list[str], seed: int | list[int]) -> np.ndarray:
        with self._lock:
            return self.policy.act(obs, tasks, seed=seed)

    async def predict(self, payload: Any, headers: dict | None = None, response_headers: dict | None = None):
        if isinstance(payload, kserve.InferRequest):
            return await self._predict_v2(payload)
        if not isinstance(payload, dict) or not isinstance(payload.get("instances"), list) or not payload["instances"]:
            raise InvalidInput('V1 body must be {"instances": [{"task": "...", "observations": [[...], ...]}]}')
        instances = payload["instances"]
        if len(instances) > MAX_BATCH:
            raise InvalidInput(f"too many instances: {len(instances)} > {MAX_BATCH} per request")
        if not all(isinstance(i, dict) for i in instances):
            raise InvalidInput('each instance must be an object like {"task": "...", "observations": [...]}')
        for i in instances:
            unknown = set(i) - {"task", "observations", "seed"}
            if unknown:
                raise InvalidInput(f"unknown field(s) {sorted(unknown)}; allowed: task, observations, seed")
            if "task" not in i or "observations" not in i:
                raise InvalidInput("every instance needs 'task' and 'observations'")
        obs = np.stack([self._observations(i["observations"]) for i in instances])
        tasks = [self._task(i["task"]) for i in instances]
        seed = [self._seed(i.get("seed", 0)) for i in instances]
        actions = await asyncio.get_running_loop().run_in_executor(None, self._act, obs, tasks, seed)
        return {"predictions": [{"actions": a.tolist(), "task": t} for a, t in zip(actions, tasks)]}

    async def _predict_v2(self, request: kserve.InferRequest) -> kserve.InferResponse:
        by_name = {i.name: i for i in request.inputs}
        missing = {"observations", "task"} - set(by_name)
        if missing:
            raise InvalidInput(f"V2 request needs inputs 'observations' (FP32 [B, history, obs]) and 'task' (BYTES "
                               f"[B]); missing {sorted(missing)}")
        o, t = by_name["observations"], by_name["task"]
        if o.datatype not in ("FP32", "FP64") or t.datatype != "BYTES":
            raise InvalidInput(f"'observations' must be FP32 and 'task' BYTES, got {o.datatype} and {t.datatype}")
        data = o.data if isinstance(o.data, list) else []
        if len(o.shape) != 3 or int(np.prod(o.shape)) != len(data):
            raise InvalidInput(f"input 'observations' shape {o.shape} must be [B, history, obs] and match its "
                               f"{len(data)} values")
        obs = self._observations(np.asarray(data, dtype=np.float64).reshape(o.shape))
        tasks = [self._task(x.decode() if isinstance(x, bytes) else x) for x in (t.data or [])]
        if len(tasks) != len(obs):
            raise InvalidInput(f"{len(obs)} observation histories but {len(tasks)} tasks")
        if len(obs) > MAX_BATCH:
            raise InvalidInput(f"too many instances: {len(obs)} > {MAX_BATCH} per request")
        seed = self._seed((request.parameters or {}).get("seed", 0))
        actions = await asyncio.get_running_loop().run_in_executor(None, self._act, obs, tasks, seed)
        out = kserve.InferOutput(name="actions", datatype="FP32", shape=list(actions.shape),
                                 data=actions.astype(np.float32).flatten().tolist())
        return kserve.InferResponse(model_name=self.name, infer_outputs=[out], response_id=request.id or "")
