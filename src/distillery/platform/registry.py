"""Registered models: versions hold a model folder (diffusers `save_pretrained`, safetensors; never a pickle),
aliases `champion`/`challenger`, gated promotion and rollback.

A version's source is the folder as logged artifacts of the run that registered it, so `models:/NAME@champion`
downloads the same folder anywhere, and the InferenceService's storageUri points at it on the object store.
Metrics travel with the version as `metric.<name>` tags, so the gate can compare with the champion without
knowing which run produced it.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from distillery.platform.tracking import client, configure

CHAMPION, CHALLENGER, HISTORY = "champion", "challenger", "distillery.champion_history"
_PICKLES = (".pkl", ".pickle")


class RegistryError(LookupError):
    pass


def _error_code(e: Exception) -> str:
    return getattr(e, "error_code", "") or ""


def register_dir(name: str, local_dir: Path, run_id: str, tags: dict | None = None, metrics: dict | None = None) -> str:
    """Log `local_dir` under the run's artifacts (`model/`) and register it as a new version aliased `challenger`.
    Returns the version number as a string."""
    import mlflow
    from mlflow.entities import LoggedModelOutput
    from mlflow.exceptions import MlflowException

    local_dir = Path(local_dir)
    files = [p for p in local_dir.rglob("*") if p.is_file()] if local_dir.is_dir() else []
    if not files:
        raise ValueError(f"register_dir needs a non-empty model folder (e.g. from save_pretrained); {local_dir} is "
                         "missing or empty")
    pickles = [str(p.relative_to(local_dir)) for p in files if p.suffix in _PICKLES]
    if pickles:
        raise ValueError(f"refusing to register pickled files {pickles}: save weights with safetensors "
                         "(save_pretrained(..., safe_serialization=True)) instead")
    c = client()
    source = f"{c.get_run(run_id).info.artifact_uri.rstrip('/')}/model"
    # The files first, checked complete, and only then the version: a version never points at a partial folder.
    try:
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run_id:
            mlflow.log_artifacts(str(local_dir), "model")
        else:
            c.log_artifacts(run_id, str(local_dir), "model")
        missing = _missing_artifacts(c, run_id, local_dir, files)
    except Exception as e:  # noqa: BLE001 - any failure of the artifact store; re-raised with what it means
        raise RegistryError(f"uploading the model folder {local_dir} to {source} failed ({type(e).__name__}: {e}); "
                            f"no version of {name!r} was created. Check that the artifact store is reachable and "
                            "retry the step") from e
    if missing:
        raise RegistryError(f"the artifact store lacks {len(missing)} of the {len(files)} files just uploaded to "
                            f"{source} (e.g. {missing[:3]}); no version of {name!r} was created. Retry the step")
    try:
        c.create_registered_model(name, tags={"distillery.format": "model-folder"})
    except MlflowException as e:
        if _error_code(e) != "RESOURCE_ALREADY_EXISTS":
            raise
    numbers = {k: float(v) for k, v in (metrics or {}).items() if _number(v)}
    mtags = {**{k: str(v) for k, v in (tags or {}).items()}, **{f"metric.{k}": repr(v) for k, v in numbers.items()}}
    # An MLflow 3 logged model links the run to what it produced (the run page's "Logged models", the model's
    # metrics); the weights stay the plain `from_pretrained` folder above, which the version's source names.
    logged = c.create_logged_model(c.get_run(run_id).info.experiment_id, source_run_id=run_id, name=name,
                                   tags={"distillery.format": "model-folder", "distillery.source": source})
    mtags["logged_model_id"] = logged.model_id
    mv = c.create_model_version(name, source=source, run_id=run_id, tags=mtags, model_id=logged.model_id)
    if numbers:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        c.log_batch(run_id, metrics=[Metric(k, v, now, 0, model_id=logged.model_id) for k, v in numbers.items()])
    c.finalize_logged_model(logged.model_id, "READY")
    c.log_outputs(run_id, [LoggedModelOutput(logged.model_id, 0)])
    c.set_registered_model_alias(name, CHALLENGER, mv.version)
    return str(mv.version)


def _missing_artifacts(c, run_id: str, local_dir: Path, files: list[Path]) -> list[str]:
    """Files of `local_dir` that are not under the run's `model/` artifacts with the same size."""
    stored, todo = {}, ["model"]
    while todo:
        for info in c.list_artifacts(run_id, todo.pop()):
            if info.is_dir:
                todo.append(info.path)
            else:
                stored[info.path] = info.file_size
    missing = []
    for f in files:
        rel = f"model/{f.relative_to(local_dir).as_posix()}"
        size = stored.get(rel, -1)
        if size == -1 or (size is not None and size != f.stat().st_size):  # some stores report no size
            missing.append(rel)
    return missing


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def by_alias(name: str, alias: str):
    """The ModelVersion an alias points at, or None when the model or the alias does not exist yet."""
    from mlflow.exceptions import MlflowException

    try:
        return client().get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if _error_code(e) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def champion(name: str):
    """The champion's ModelVersion, or None when the model or the alias does not exist yet."""
    return by_alias(name, CHAMPION)


def set_alias(name: str, alias: str, version: str) -> None:
    client().set_registered_model_alias(name, alias, str(version))


def champion_metrics(name: str) -> dict[str, float]:
    mv = champion(name)
    if mv is None:
        return {}
    return {k.removeprefix("metric."): float(v) for k, v in mv.tags.items() if k.startswith("metric.")}


def _model(name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client().get_registered_model(name)
    except MlflowException as e:
        if _error_code(e) == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"no registered model named {name!r}; `distillery models` lists them") from None
        raise


def _history(name: str) -> list[str]:
    return json.loads(_model(name).tags.get(HISTORY, "[]"))


def promote(name: str, version: str) -> None:
    """Alias `version` champion; the champion it replaces is remembered for `rollback`."""
    from mlflow.exceptions import MlflowException

    c = client()
    history = _history(name)
    try:
        c.get_model_version(name, str(version))
    except MlflowException as e:
        raise RegistryError(f"{name} has no version {version!r}") from e
    current = champion(name)
    if current is not None and str(current.version) == str(version):
        return
    if current is not None:
        history.append(str(current.version))
    c.set_registered_model_tag(name, HISTORY, json.dumps(history[-50:]))
    c.set_registered_model_alias(name, CHAMPION, str(version))
    publish_champion(name, str(version))
    aliases = dict(_model(name).aliases or {})
    if str(aliases.get(CHALLENGER, "")) == str(version):
        c.delete_registered_model_alias(name, CHALLENGER)  # it won: no longer a challenger


def rollback(name: str) -> str:
    """Move `champion` back to the previous champion; returns that version."""
    c = client()
    history = _history(name)
    if not history:
        raise ValueError(f"{name} has no previous champion to roll back to (it was promoted at most once)")
    previous = history.pop()
    c.set_registered_model_alias(name, CHAMPION, previous)
    c.set_registered_model_tag(name, HISTORY, json.dumps(history))
    publish_champion(name, previous)
    return previous


def champion_uri(name: str) -> str:
    """The stable location of the champion's folder: the storageUri of the GitOps InferenceServices in
    manifests/inference (a version's own folder moves with every registration)."""
    from distillery.settings import get_settings

    return f"{get_settings().champions_root}/{name}"


def publish_champion(name: str, version: str) -> str:
    """Copy the version's folder to `champion_uri(name)`; the versions of one model have the same file names,
    so the copy replaces the previous champion's files."""
    import tempfile

    from distillery.platform import storage

    with tempfile.TemporaryDirectory() as tmp:
        local = download(name, version, dst=Path(tmp))
        storage.upload(local, champion_uri(name))
    return champion_uri(name)


def version_for_run(name: str, parent_run_id: str) -> str | None:
    """The newest version a pipeline run registered (tagged with its parent run id), if any."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client().search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    hits = [v for v in versions if v.tags.get("parent_run_id") == parent_run_id]
    return str(max(int(v.version) for v in hits)) if hits else None


def storage_uri(name: str, version: str) -> str:
    """Where the version's folder lives (s3://... in production): the InferenceService's storageUri."""
    return client().get_model_version(name, str(version)).source


def download(name: str, ref: str = CHAMPION, dst: Path | None = None) -> Path:
    """`models:/NAME@alias` (ref an alias) or `models:/NAME/N` (ref a version number) -> a local folder that
    `from_pretrained` loads."""
    import mlflow
    from mlflow.exceptions import MlflowException

    configure()
    ref = str(ref)
    uri = f"models:/{name}/{ref}" if ref.isdigit() else f"models:/{name}@{ref}"
    if dst is not None:
        Path(dst).mkdir(parents=True, exist_ok=True)
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst) if dst else None))
    except MlflowException as e:
        if _error_code(e) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise RegistryError(f"cannot resolve {uri}: {e.message}. Register a version first, or pass an "
                                "existing alias/version") from e
        raise


def list_models() -> list[dict]:
    """One dict per registered model: name, versions, aliases (alias -> version), champion metrics."""
    c = client()
    out = []
    for rm in c.search_registered_models():
        versions = c.search_model_versions(f"name='{rm.name}'")
        out.append({"name": rm.name, "versions": sorted((str(v.version) for v in versions), key=int),
                    "aliases": {k: str(v) for k, v in (rm.aliases or {}).items()},
                    "champion_metrics": champion_metrics(rm.name)})
    return out


# Metrics that name the evaluator (the versioned feature network) that scored a run; see steps.evaluator_identity.
EVALUATOR_KEYS = ("evaluator_key", "evaluator_version")


def noise_tolerance(metrics: dict, champion_metrics: dict, metric: str) -> float:
    """How far apart two values of `metric` may be by sampling noise alone: the half-widths of both runs' 95%
    intervals (`METRIC_ci_low` / `METRIC_ci_high`) added in quadrature; 0 when neither run reported one."""
    def half_width(m: dict) -> float:
        lo, hi = m.get(f"{metric}_ci_low"), m.get(f"{metric}_ci_high")
        return (hi - lo) / 2 if _number(lo) and _number(hi) and hi >= lo else 0.0

    return math.hypot(half_width(metrics), half_width(champion_metrics))


def gate(metrics: dict, thresholds: dict, champion_metrics: dict, directions: dict) -> tuple[bool, list[str]]:
    """Every threshold must hold (`{"fd": ("max", 50.0)}`) and the candidate must not be worse than the champion
    on the primary metric (the first of `directions`, e.g. `{"fd": "min"}`) beyond the noise of the two
    measurements (`noise_tolerance`). Runs scored by different evaluators (`evaluator_version`) are never
    compared. Returns (passed, reasons)."""
    reasons = []
    for metric, spec in thresholds.items():
        if not isinstance(spec, (tuple, list)) or len(spec) != 2 or spec[0] not in ("max", "min") or not _number(spec[1]):
            raise ValueError(f"threshold for {metric} must be ('max' or 'min', number), got {spec!r}")
        kind, bound = spec
        value = metrics.get(metric)
        if not _number(value):
            reasons.append(f"{metric} missing or not a finite number ({value!r})")
        elif kind == "max" and value > bound:
            reasons.append(f"{metric}={value:.4g} is above the maximum {bound:.4g}")
        elif kind == "min" and value < bound:
            reasons.append(f"{metric}={value:.4g} is below the minimum {bound:.4g}")
    bad = {k: v for k, v in directions.items() if v not in ("min", "max")}
    if bad:
        raise ValueError(f"directions must be 'min' (lower is better) or 'max', got {bad}")
    if directions and champion_metrics:
        ours_ev, theirs_ev = metrics.get("evaluator_version"), champion_metrics.get("evaluator_version")
        if any(metrics.get(k) != champion_metrics.get(k) for k in EVALUATOR_KEYS):
            reasons.append(f"the candidate was scored by evaluator version {ours_ev}, the champion by {theirs_ev}: "
                           f"their metrics are not comparable. Re-evaluate the champion with the same evaluator, or "
                           f"promote by hand (`distillery models promote`) after comparing them yourself")
            return False, reasons
        primary, direction = next(iter(directions.items()))
        ours, theirs = metrics.get(primary), champion_metrics.get(primary)
        if _number(theirs):
            tol = noise_tolerance(metrics, champion_metrics, primary)
            if not _number(ours):
                reasons.append(f"{primary} missing or not a finite number ({ours!r}): cannot compare with the "
                               f"champion's {theirs:.4g}")
            elif (ours > theirs + tol) if direction == "min" else (ours < theirs - tol):
                reasons.append(f"{primary}={ours:.4g} is worse than the champion's {theirs:.4g} beyond the noise "
                               f"tolerance {tol:.3g} ({'lower' if direction == 'min' else 'higher'} is better)")
    return not reasons, reasons
