"""Locomotion predictor: a saved teacher-prior student behind KServe's V1 and V2 protocols.

V1  POST /v1/models/NAME:predict
    {"instances": [{"observations": [[21 floats] x history]}]}  (each frame: 14 noisy joint angles / velocities /
    torso pitch and pitch rate, the 6 previous actions, the commanded velocity; oldest frame first)
    -> {"predictions": [{"action": [6 floats in [-1, 1]]}]}
V2  POST /v2/models/NAME/infer: input "observations" FP32 [B, history, 21] (JSON, binary tensor data, or gRPC)
    -> output "actions" FP32 [B, 6]
Histories of the wrong shape, NaN or infinite values and missing fields are answered with 400. Concurrent requests
are answered from one batched policy call (the policy is deterministic, so batching does not change an action).
"""

from __future__ import annotations

from typing import Any

import kserve
import numpy as np
from kserve.errors import InvalidInput

from distillery.serving.batching import deadline_from
from distillery.serving.policy import PolicyFolderModel
from distillery.serving.server import register_kind, v2_array

MAX_BATCH = 256


@register_kind("locomotion")
class LocomotionModel(PolicyFolderModel):
    max_items = MAX_BATCH
    saved_as = "locomotion policy"

    def load_model(self) -> None:
        import torch

        from distillery.papers.teacher_prior.policy import load_policy

        torch.set_num_threads(1)  # a 2-layer MLP: threads cost more than they give
        self.policy = load_policy(self.model_dir)
        if self.policy.role == "teacher":
            raise ValueError(f"{self.model_dir} holds the privileged teacher: it needs observations a robot does not "
                             f"have; serve a student")

    @property
    def _shape(self) -> tuple[int, int]:
        from distillery.papers.teacher_prior.env import FRAME

        return self.policy.cfg.history, FRAME

    def get_input_types(self) -> list[dict]:
        return [{"name": "observations", "datatype": "FP32", "shape": [-1, *self._shape]}]

    def get_output_types(self) -> list[dict]:
        return [{"name": "actions", "datatype": "FP32", "shape": [-1, 6]}]

    def _history(self, value: Any) -> np.ndarray:
        want = self._shape
        try:
            h = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise InvalidInput(f"'observations' must be numbers shaped {list(want)} per instance (history x frame)") \
                from None
        if h.ndim != 3 or h.shape[1:] != want:
            raise InvalidInput(f"'observations' must be shaped {list(want)} per instance (history x frame), got "
                               f"{list(h.shape[1:]) if h.ndim >= 2 else list(h.shape)}")
        if not np.isfinite(h).all():
            raise InvalidInput("'observations' contain NaN or infinite values")
        if not 1 <= len(h) <= MAX_BATCH:
            raise InvalidInput(f"between 1 and {MAX_BATCH} instances per request, got {len(h)}")
        return h.astype(np.float32)

    def run_batch(self, key: None, items: list[np.ndarray]) -> list[np.ndarray]:
        with self._lock:
            return list(self.policy.act_history(np.stack(items)))

    async def _actions(self, history: np.ndarray, headers: dict | None) -> np.ndarray:
        return np.stack(await self.batcher.submit(None, list(history), deadline_from(headers)))

    async def predict(self, payload: Any, headers: dict | None = None, response_headers: dict | None = None):
        if isinstance(payload, kserve.InferRequest):
            return await self._predict_v2(payload, headers)
        if not isinstance(payload, dict) or not isinstance(payload.get("instances"), list) or not payload["instances"]:
            raise InvalidInput('V1 body must be {"instances": [{"observations": [[frame] x history]}]}')
        instances = payload["instances"]
        if len(instances) > MAX_BATCH:
            raise InvalidInput(f"too many instances: {len(instances)} > {MAX_BATCH} per request")
        for i in instances:
            if not isinstance(i, dict) or set(i) != {"observations"}:
                raise InvalidInput(f"every instance must be an object with exactly ['observations'], got "
                                   f"{sorted(i) if isinstance(i, dict) else type(i).__name__}")
        out = await self._actions(self._history([i["observations"] for i in instances]), headers)
        return {"predictions": [{"action": [float(x) for x in a]} for a in out]}

    async def _predict_v2(self, request: kserve.InferRequest, headers: dict | None) -> kserve.InferResponse:
        names = [i.name for i in request.inputs]
        if names != ["observations"]:
            raise InvalidInput(f"V2 request needs one input 'observations' FP32 [B, {', '.join(map(str, self._shape))}]"
                               f", got {names}")
        if any(o.name != "actions" for o in request.request_outputs or []):
            raise InvalidInput("this model has one output, 'actions'")
        out = await self._actions(self._history(v2_array(request.inputs[0], ("FP32", "FP64", "FP16"))), headers)
        binary = True if request.from_grpc else request.use_binary_outputs
        result = kserve.InferOutput(name="actions", datatype="FP32", shape=list(out.shape),
                                    data=out.astype(np.float32).reshape(-1).tolist() if request.from_grpc
                                    else out.astype(np.float32))  # KServe's to_grpc takes a list
        return kserve.InferResponse(model_name=self.name, infer_outputs=[result], response_id=request.id or "",
                                    use_binary_outputs=binary, requested_outputs=request.request_outputs)
