"""Navigation predictor: a saved SMDP navigation policy behind KServe's V1 and V2 protocols.

V1  POST /v1/models/NAME:predict
    {"instances": [{"scan": [BEAMS ranges in m], "goal": [distance m, bearing rad], "velocity": [v m/s, w rad/s]}]}
    -> {"predictions": [{"v": m/s, "w": rad/s, "duration": s}]}  (hold (v, w) for duration seconds, then ask again)
V2  POST /v2/models/NAME/infer: inputs "scan" FP32 [B, BEAMS], "goal" FP32 [B, 2], "velocity" FP32 [B, 2]
    (JSON, binary tensor data, or gRPC) -> output "command" FP32 [B, 3] (v, w, duration)
Scans of the wrong length, NaN or infinite values, negative ranges and missing fields are answered with 400.
Concurrent requests are answered from one batched policy call (the policy is deterministic, so batching does not
change a command).
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
FIELDS = ("scan", "goal", "velocity")


@register_kind("navigation")
class NavigationModel(PolicyFolderModel):
    max_items = MAX_BATCH
    saved_as = "navigation policy"

    def load_model(self) -> None:
        import torch

        from distillery.papers.smdp_nav.policy import NavPolicy

        torch.set_num_threads(1)  # a 2-layer MLP: threads cost more than they give
        self.policy = NavPolicy(self.model_dir)

    def get_input_types(self) -> list[dict]:
        return [{"name": "scan", "datatype": "FP32", "shape": [-1, self.policy.cfg.beams]},
                {"name": "goal", "datatype": "FP32", "shape": [-1, 2]},
                {"name": "velocity", "datatype": "FP32", "shape": [-1, 2]}]

    def get_output_types(self) -> list[dict]:
        return [{"name": "command", "datatype": "FP32", "shape": [-1, 3]}]

    def _array(self, name: str, value: Any, width: int) -> np.ndarray:
        try:
            a = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise InvalidInput(f"'{name}' must be numbers, {width} per instance") from None
        if a.ndim != 2 or a.shape[1] != width:
            got = a.shape[-1] if a.ndim else "a scalar"
            raise InvalidInput(f"'{name}' must have {width} values per instance, got {got}")
        if not np.isfinite(a).all():
            raise InvalidInput(f"'{name}' contains NaN or infinite values")
        return a

    def _inputs(self, scan, goal, velocity) -> tuple[np.ndarray, ...]:
        scan, goal, velocity = (self._array("scan", scan, self.policy.cfg.beams), self._array("goal", goal, 2),
                                self._array("velocity", velocity, 2))
        if (scan < 0).any():
            raise InvalidInput("'scan' ranges must be >= 0 metres")
        if (goal[:, 0] < 0).any():
            raise InvalidInput("'goal' distance must be >= 0 metres")
        if not len(scan) == len(goal) == len(velocity):
            raise InvalidInput(f"{len(scan)} scans, {len(goal)} goals and {len(velocity)} velocities")
        if not 1 <= len(scan) <= MAX_BATCH:
            raise InvalidInput(f"between 1 and {MAX_BATCH} instances per request, got {len(scan)}")
        return scan, goal, velocity

    def run_batch(self, key: None, items: list[np.ndarray]) -> list[np.ndarray]:
        x = np.stack(items)  # rows: scan, goal distance and bearing, v, w
        beams = self.policy.cfg.beams
        with self._lock:
            v, w, tau = self.policy.command(x[:, :beams], x[:, beams], x[:, beams + 1], x[:, beams + 2],
                                            x[:, beams + 3])
        return list(np.stack([v, w, tau], 1))

    async def _command(self, scan, goal, velocity, headers: dict | None) -> np.ndarray:
        rows = list(np.concatenate([scan, goal, velocity], 1))
        return np.stack(await self.batcher.submit(None, rows, deadline_from(headers)))

    async def predict(self, payload: Any, headers: dict | None = None, response_headers: dict | None = None):
        if isinstance(payload, kserve.InferRequest):
            return await self._predict_v2(payload, headers)
        if not isinstance(payload, dict) or not isinstance(payload.get("instances"), list) or not payload["instances"]:
            raise InvalidInput('V1 body must be {"instances": [{"scan": [...], "goal": [d, bearing], '
                               '"velocity": [v, w]}]}')
        instances = payload["instances"]
        if len(instances) > MAX_BATCH:
            raise InvalidInput(f"too many instances: {len(instances)} > {MAX_BATCH} per request")
        for i in instances:
            if not isinstance(i, dict) or set(i) != set(FIELDS):
                raise InvalidInput(f"every instance must be an object with exactly {list(FIELDS)}, got "
                                   f"{sorted(i) if isinstance(i, dict) else type(i).__name__}")
        out = await self._command(*self._inputs(*([i[f] for i in instances] for f in FIELDS)), headers)
        return {"predictions": [{"v": float(v), "w": float(w), "duration": float(d)} for v, w, d in out]}

    async def _predict_v2(self, request: kserve.InferRequest, headers: dict | None) -> kserve.InferResponse:
        by_name = {i.name: i for i in request.inputs}
        missing, unknown = set(FIELDS) - set(by_name), set(by_name) - set(FIELDS)
        if missing or unknown:
            raise InvalidInput(f"V2 request needs inputs 'scan' FP32 [B, beams], 'goal' FP32 [B, 2] and 'velocity' "
                               f"FP32 [B, 2]; missing {sorted(missing)}, unknown {sorted(unknown)}")
        if any(o.name != "command" for o in request.request_outputs or []):
            raise InvalidInput("this model has one output, 'command'")
        arrays = [v2_array(by_name[f], ("FP32", "FP64", "FP16")) for f in FIELDS]
        out = await self._command(*self._inputs(*arrays), headers)
        binary = True if request.from_grpc else request.use_binary_outputs
        result = kserve.InferOutput(name="command", datatype="FP32", shape=list(out.shape),
                                    data=out.astype(np.float32).reshape(-1).tolist() if request.from_grpc
                                    else out.astype(np.float32))  # KServe's to_grpc takes a list
        return kserve.InferResponse(model_name=self.name, infer_outputs=[result], response_id=request.id or "",
                                    use_binary_outputs=binary, requested_outputs=request.request_outputs)
