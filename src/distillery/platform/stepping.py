"""Runs one pipeline step inside its nested MLflow run: the tracking every component gets without
writing it. A component calls `run_step(...)` with the function that does the work; the function's
returned numbers become MLflow metrics and KFP Metrics, its exceptions fail both the run and the task.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable


def run_step(
    fn: Callable[..., dict | None],
    *,
    pipeline: str,
    step: str,
    kfp_run_id: str = "",
    kfp_metrics: Any = None,
    **kwargs: Any,
) -> dict:
    import mlflow

    from distillery.models.training import global_rank, set_cpu_threads
    from distillery.platform import tracking
    from distillery.settings import get_settings

    set_cpu_threads()
    if global_rank() != 0:
        # A training step started as several DDP processes: the others train alongside rank 0 and do nothing else
        # (training steps return after training on them), so the step has one run, one set of metrics, and what
        # it registers is registered once.
        return fn(**kwargs) or {}
    parent = get_settings().parent_run_id or ""
    with tracking.step_run(pipeline, step, parent_run_id=parent, kfp_run_id=kfp_run_id):
        mlflow.log_params({k: _param(v) for k, v in kwargs.items() if not k.endswith("_dir") and not k.endswith("_path")})
        result = fn(**kwargs) or {}
        numbers = {k: float(v) for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        tracking.log_metrics(numbers)
        if kfp_metrics is not None:
            finite = {k: v for k, v in numbers.items() if math.isfinite(v)}
            for k, v in finite.items():
                kfp_metrics.log_metric(k, v)
            # The metrics also go to the artifact's file: KFP's local cache treats an output whose file is
            # missing as a miss, so a step with only metadata in its Metrics would never be reused.
            path = Path(kfp_metrics.path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(finite, indent=1))
        return result


def _param(v: Any) -> str:
    s = str(v)
    return s if len(s) <= 500 else s[:497] + "..."
