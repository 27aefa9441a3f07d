"""Policy predictor: a saved MoDE (or dense) diffusion policy behind KServe's V1 and V2 protocols.

V1  POST /v1/models/NAME:predict
    {"instances": [{"task": "reach-v3" or its instruction, "observations": [[39 floats] x history], "seed"?: int}]}
    (each instance is sampled with its own seed, default 0: batching does not change an instance's actions)
    -> {"predictions": [{"actions": [[4 floats] x chunk], "task": "reach-v3"}]}
V2  POST /v2/models/NAME/infer: inputs "observations" FP32 [B, history, 39] and "task" BYTES [B]; "seed" as a parameter
    or an INT64 input, shape [1] (instance i gets seed + i) or [B] (one each); JSON, binary tensor data, or gRPC
    -> output "actions" FP32 [B, chunk, 4]
Observations of the wrong shape, NaN or infinite values and unknown tasks are answered with 400. Concurrent
requests are answered from one batched policy call; each instance draws its noise from its own seed, so its
actions do not depend on what else was in the batch.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import kserve
import numpy as np
from kserve.errors import InvalidInput

from distillery.serving.batching import deadline_from
from distillery.serving.server import ServedModel, register_kind, v2_array, v2_parameters

MAX_BATCH = 64


class PolicyFolderModel(ServedModel):
    """A predictor of a saved policy folder (policy.json + weights): one policy, called under one lock."""

    saved_as = "policy"  # what the folder must be, for the error message

    def __init__(self, name: str, model_dir: Path, **batching):
        super().__init__(name, model_dir, **batching)
        self.policy = None
        self._lock = threading.Lock()

    def check(self) -> None:
        if not (self.model_dir / "policy.json").exists():
            raise FileNotFoundError(f"{self.model_dir} is not a saved {self.saved_as} (no policy.json)")


@register_kind("policy")
class PolicyModel(PolicyFolderModel):
    max_items = MAX_BATCH

    def load_model(self) -> None:
        import torch

        from distillery.papers.mode.policy import Policy

        torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
        self.policy = Policy(self.model_dir)  # expert cache, frozen into one graph: same actions, less work

    def get_input_types(self) -> list[dict]:
        cfg = self.policy.cfg
        return [{"name": "observations", "datatype": "FP32", "shape": [-1, cfg.obs_history, cfg.obs_dim]},
                {"name": "task", "datatype": "BYTES", "shape": [-1]},
                {"name": "seed", "datatype": "INT64", "shape": [-1]}]

    def get_output_types(self) -> list[dict]:
        return [{"name": "actions", "datatype": "FP32", "shape": [-1, self.policy.cfg.chunk, self.policy.cfg.act_dim]}]

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
        if isinstance(value, float) and value.is_integer():  # is_integer is False for inf and NaN
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2 ** 63 - MAX_BATCH:
            raise InvalidInput(f"'seed' must be a non-negative integer, got {value!r}")
        return int(value)

    def run_batch(self, key: None, items: list[tuple[np.ndarray, str, int]]) -> list[np.ndarray]:
        obs = np.stack([o for o, _, _ in items])
        with self._lock:
            return list(self.policy.act(obs, [t for _, t, _ in items], seed=[s for _, _, s in items]))

    async def _act(self, obs: np.ndarray, tasks: list[str], seeds: list[int], headers: dict | None) -> np.ndarray:
        return np.stack(await self.batcher.submit(None, list(zip(obs, tasks, seeds)), deadline_from(headers)))

    async def predict(self, payload: Any, headers: dict | None = None, response_headers: dict | None = None):
        if isinstance(payload, kserve.InferRequest):
            return await self._predict_v2(payload, headers)
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
        actions = await self._act(obs, tasks, seed, headers)
        return {"predictions": [{"actions": a.tolist(), "task": t} for a, t in zip(actions, tasks)]}

    async def _predict_v2(self, request: kserve.InferRequest, headers: dict | None) -> kserve.InferResponse:
        by_name = {i.name: i for i in request.inputs}
        missing = {"observations", "task"} - set(by_name)
        unknown = set(by_name) - {"observations", "task", "seed"}
        if missing or unknown:
            raise InvalidInput(f"V2 request needs inputs 'observations' (FP32 [B, history, obs]) and 'task' (BYTES "
                               f"[B]), and may have 'seed' (INT64); missing {sorted(missing)}, unknown {sorted(unknown)}")
        if any(o.name != "actions" for o in request.request_outputs or []):
            raise InvalidInput("this model has one output, 'actions'")
        raw = v2_array(by_name["observations"], ("FP32", "FP64", "FP16"))
        if raw.ndim != 3:
            raise InvalidInput(f"input 'observations' must be shaped [B, history, obs], got {list(raw.shape)}")
        obs = self._observations(raw)
        task = v2_array(by_name["task"], ("BYTES",)).reshape(-1)
        tasks = [self._task(x.decode(errors="replace") if isinstance(x, bytes) else x) for x in task]
        if len(tasks) != len(obs):
            raise InvalidInput(f"{len(obs)} observation histories but {len(tasks)} tasks")
        if not 1 <= len(obs) <= MAX_BATCH:
            raise InvalidInput(f"between 1 and {MAX_BATCH} instances per request, got {len(obs)}")
        if "seed" in by_name:
            given = [self._seed(v.item()) for v in v2_array(by_name["seed"], ("INT64", "INT32", "UINT64", "UINT32"))
                     .reshape(-1)]
            if len(given) not in (1, len(obs)):
                raise InvalidInput(f"input 'seed' must hold 1 or {len(obs)} values, got {len(given)}")
        else:
            given = [self._seed(v2_parameters(request).get("seed", 0))]
        seeds = given if len(given) == len(obs) else [given[0] + i for i in range(len(obs))]
        actions = await self._act(obs, tasks, seeds, headers)
        binary = True if request.from_grpc else request.use_binary_outputs
        out = kserve.InferOutput(name="actions", datatype="FP32", shape=list(actions.shape),
                                 data=actions.astype(np.float32).reshape(-1).tolist() if request.from_grpc
                                 else actions.astype(np.float32))  # KServe's to_grpc takes a list
        return kserve.InferResponse(model_name=self.name, infer_outputs=[out], response_id=request.id or "",
                                    use_binary_outputs=binary, requested_outputs=request.request_outputs)
