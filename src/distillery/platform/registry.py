"""Registered models: versions hold a model folder (diffusers `save_pretrained`, safetensors; never a pickle),
aliases `champion`/`challenger`, gated promotion and rollback.

A version's source is the folder as logged artifacts of the run that registered it, so `models:/NAME@champion`
downloads the same folder anywhere, and the InferenceService's storageUri points at it on the object store.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from distillery.platform.tracking import client

CHAMPION, CHALLENGER, HISTORY = "champion", "challenger", "distillery.champion_history"


def register_dir(name: str, local_dir: Path, run_id: str, tags: dict | None = None, metrics: dict | None = None) -> str:
    """Log `local_dir` under the run's artifacts and register it as a new version (aliased challenger)."""
    import mlflow

    c = client()
    if mlflow.active_run() and mlflow.active_run().info.run_id == run_id:
        mlflow.log_artifacts(str(local_dir), "model")
    else:
        c.log_artifacts(run_id, str(local_dir), "model")
    try:
        c.create_registered_model(name)
    except Exception:  # noqa: BLE001 - it exists already
        pass
    source = f"{c.get_run(run_id).info.artifact_uri.rstrip('/')}/model"
    mtags = {**(tags or {}), **{f"metric.{k}": str(v) for k, v in (metrics or {}).items() if _number(v)}}
    mv = c.create_model_version(name, source=source, run_id=run_id, tags=mtags)
    c.set_registered_model_alias(name, CHALLENGER, mv.version)
    return str(mv.version)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def champion(name: str):
    try:
        return client().get_model_version_by_alias(name, CHAMPION)
    except Exception:  # noqa: BLE001 - no model or no alias yet
        return None


def champion_metrics(name: str) -> dict[str, float]:
    mv = champion(name)
    if mv is None:
        return {}
    return {k.removeprefix("metric."): float(v) for k, v in mv.tags.items() if k.startswith("metric.")}


def _history(name: str) -> list[str]:
    tags = client().get_registered_model(name).tags
    return json.loads(tags.get(HISTORY, "[]"))


def promote(name: str, version: str) -> None:
    """Alias `version` champion; the champion it replaces is remembered for `rollback`."""
    c = client()
    c.get_model_version(name, str(version))  # fails clearly for an unknown version
    current = champion(name)
    if current is not None and str(current.version) == str(version):
        return
    history = _history(name) + ([str(current.version)] if current is not None else [])
    c.set_registered_model_alias(name, CHAMPION, str(version))
    c.set_registered_model_tag(name, HISTORY, json.dumps(history[-50:]))


def rollback(name: str) -> str:
    """Move `champion` back to the previous champion."""
    c = client()
    history = _history(name)
    if not history:
        raise ValueError(f"{name} has no previous champion to roll back to")
    previous = history.pop()
    c.set_registered_model_alias(name, CHAMPION, previous)
    c.set_registered_model_tag(name, HISTORY, json.dumps(history))
    return previous


def version_for_run(name: str, parent_run_id: str) -> str | None:
    """The version a pipeline run registered, if any."""
    try:
        versions = client().search_model_versions(f"name='{name}'")
    except Exception:  # noqa: BLE001
        return None
    hits = [v for v in versions if v.tags.get("parent_run_id") == parent_run_id]
    return str(max(int(v.version) for v in hits)) if hits else None


def storage_uri(name: str, version: str) -> str:
    """Where the version's folder lives (s3://... in production): the InferenceService's storageUri."""
    return client().get_model_version(name, str(version)).source


def download(name: str, ref: str = CHAMPION, dst: Path | None = None) -> Path:
    """`models:/NAME@alias` or `models:/NAME/version` -> a local folder."""
    import mlflow

    from distillery.platform.tracking import configure

    configure()
    uri = f"models:/{name}/{ref}" if str(ref).isdigit() else f"models:/{name}@{ref}"
    if dst is not None:
        Path(dst).mkdir(parents=True, exist_ok=True)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst) if dst else None))


def list_models() -> list[dict]:
    c = client()
    out = []
    for rm in c.search_registered_models():
        versions = c.search_model_versions(f"name='{rm.name}'")
        out.append({"name": rm.name, "versions": sorted(str(v.version) for v in versions),
                    "aliases": dict(rm.aliases or {}), "champion_metrics": champion_metrics(rm.name)})
    return out


def gate(metrics: dict, thresholds: dict, champion_metrics: dict, directions: dict) -> tuple[bool, list[str]]:
    """Every threshold must hold (`{"fd": ("max", 50.0)}`) and the candidate must not be worse than the champion
    on the primary metric (the first of `directions`, e.g. `{"fd": "min"}`)."""
    reasons = []
    for metric, (kind, bound) in thresholds.items():
        value = metrics.get(metric)
        if not _number(value):
            reasons.append(f"{metric} missing or not a finite number ({value!r})")
        elif kind == "max" and value > bound:
            reasons.append(f"{metric}={value:.4g} is above the maximum {bound:.4g}")
        elif kind == "min" and value < bound:
            reasons.append(f"{metric}={value:.4g} is below the minimum {bound:.4g}")
        elif kind not in ("max", "min"):
            reasons.append(f"threshold kind for {metric} must be 'max' or 'min', got {kind!r}")
    if directions:
        primary, direction = next(iter(directions.items()))
        ours, theirs = metrics.get(primary), champion_metrics.get(primary)
        if _number(ours) and _number(theirs):
            worse = ours > theirs if direction == "min" else ours < theirs
            if worse:
                reasons.append(f"{primary}={ours:.4g} is worse than the champion's {theirs:.4g}")
    return not reasons, reasons
