"""Navigation predictor: a saved SMDP navigation policy behind KServe's V1 and V2 protocols.

V1  POST /v1/models/NAME:predict
    {"instances": [{"scan": [BEAMS ranges in m], "goal": [distance m, bearing rad], "velocity": [v m/s, w rad/s]}]}
    -> {"predictions": [{"v": m/s, "w": rad/s, "duration": s}]}  (hold (v, w) for duration seconds, then ask again)
V2  POST /v2/models/NAME/infer: inputs "scan" FP32 [B, BEAMS], "goal" FP32 [B, 2], "velocity" FP32 [B, 2]
    -> output "command" FP32 [B, 3] (v, w, duration)
Scans of the wrong length, NaN or infinite values, negative ranges and missing fields are answered with 400.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import kserve
import numpy as np
from kserve.errors import InvalidInput

from distillery.serving.server import register_kind

MAX_BATCH = 256
FIELDS = ("scan", "goal", "velocity")


@register_kind("navigation")
class NavigationModel(kserve.Model):
    def __init__(self, name: str, model_dir: Path):
        super().__init__(name)
        self.model_dir = Path(model_dir)
        self.policy = None
        self._lock = threading.Lock()

    def load(self) -> bool:
        import torch

        from distillery.papers.smdp_nav.policy import NavPolicy

        torch.set_num_threads(1)  # a 2-layer MLP: threads cost more than they give
        self.policy = NavPolicy(self.model_dir)
        self.ready = True
        return True

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
        beams = self.policy.cfg.beams
        scan, goal, velocity = (self._array("scan", scan, beams), self._array("goal", goal, 2),
                                self._array("velocity", velocity, 2))
        if (scan < 0).any():
            raise InvalidInput("'scan' ranges must be >= 0 metres")
        if (goal[:, 0] < 0).any():
            raise InvalidInput("'goal' distance must be >= 0 metres")
        if not len(scan) == len(goal) == len(velocity):
            raise InvalidInput(f"{len(scan)} scans, {len(goal)} goals and {len(velocity)} velocities")
        if len(scan) > MAX_BATCH:
            raise InvalidInput(f"too many instances: {len(scan)} > {MAX_BATCH} per request")
        return scan, goal, velocity

    def _command(self, scan, goal, velocity) -> np.ndarray:
        with self._lock:
            v, w, tau = self.policy.command(scan, goal[:, 0], goal[:, 1], velocity[:, 0], velocity[:, 1])
        return np.stack([v, w, tau], 1)

    async def predict(self, payload: Any, headers: dict | None = None, response_headers: dict | None = None):
        if isinstance(payload, kserve.InferRequest):
            return await self._predict_v2(payload)
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
        scan, goal, velocity = self._inputs(*([i[f] for i in instances] for f in FIELDS))
        out = await asyncio.get_running_loop().run_in_executor(None, self._command, scan, goal, velocity)
        return {"predictions": [{"v": float(v), "w": float(w), "duration": float(d)} for v, w, d in out]}

    async def _predict_v2(self, request: kserve.InferRequest) -> kserve.InferResponse:
        by_name = {i.name: i for i in request.inputs}
        missing = set(FIELDS) - set(by_name)
        if missing:
            raise InvalidInput(f"V2 request needs inputs 'scan' FP32 [B, beams], 'goal' FP32 [B, 2] and 'velocity' "
                               f"FP32 [B, 2]; missing {sorted(missing)}")
        arrays = []
        for name in FIELDS:
            x = by_name[name]
            if x.datatype not in ("FP32", "FP64"):
                raise InvalidInput(f"input '{name}' must be FP32, got {x.datatype}")
            data = x.data if isinstance(x.data, list) else []
            if len(x.shape) != 2 or int(np.prod(x.shape)) != len(data):
                raise InvalidInput(f"input '{name}' shape {x.shape} must be [B, n] and match its {len(data)} values")
            arrays.append(np.asarray(data, dtype=np.float64).reshape(x.shape))
        out = await asyncio.get_running_loop().run_in_executor(None, self._command, *self._inputs(*arrays))
        result = kserve.InferOutput(name="command", datatype="FP32", shape=list(out.shape),
                                    data=out.astype(np.float32).flatten().tolist())
        return kserve.InferResponse(model_name=self.name, infer_outputs=[result], response_id=request.id or "")
