"""MLflow: one parent run per pipeline run, one nested run per step, tagged for lineage.

Steps run in separate processes (the KFP runner's subprocesses or a cluster's pods). They find their
parent run from the settings (`distillery run` opens it and names it in DISTILLERY_PARENT_RUN_ID) or,
on a cluster, by the KFP run id: the first step of a KFP run creates the parent and the others find it.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from distillery.settings import get_settings

log = logging.getLogger(__name__)
ROLE = "distillery.role"


def configure() -> None:
    import mlflow

    s = get_settings()
    mlflow.set_tracking_uri(s.mlflow_tracking_uri)
    mlflow.set_registry_uri(s.mlflow_registry_uri)


def tracking_uri() -> str:
    return get_settings().mlflow_tracking_uri


def client():
    from mlflow import MlflowClient

    configure()
    s = get_settings()
    return MlflowClient(tracking_uri=s.mlflow_tracking_uri, registry_uri=s.mlflow_registry_uri)


def experiment_for(pipeline: str) -> str:
    """The experiment `distillery/<pipeline>`, created with the configured artifact root."""
    c = client()
    name = f"distillery/{pipeline}"
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = get_settings().mlflow_artifact_location.rstrip("/")
    try:
        return c.create_experiment(name, artifact_location=f"{root}/{pipeline}", tags={"pipeline": pipeline})
    except Exception:  # noqa: BLE001 - another step created it at the same moment
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _flat(params: dict[str, Any]) -> dict[str, str]:
    return {k: (json.dumps(v) if isinstance(v, (dict, list)) else str(v))[:6000] for k, v in params.items()}


def start_pipeline_run(pipeline: str, params: dict[str, Any], tags: dict[str, str] | None = None,
                       kfp_run_id: str = "") -> str:
    """Open the parent run of one pipeline run; it stays RUNNING until `finish_pipeline_run`."""
    c = client()
    run = c.create_run(experiment_for(pipeline), run_name=f"{pipeline}",
                       tags={ROLE: "pipeline", "pipeline": pipeline, "kfp_run_id": kfp_run_id,
                             "git_commit": git_commit(), **(tags or {})})
    for k, v in _flat(params).items():
        c.log_param(run.info.run_id, k, v)
    return run.info.run_id


def finish_pipeline_run(run_id: str, status: str = "FINISHED") -> None:
    client().set_terminated(run_id, status)


def _parent_for_kfp_run(pipeline: str, kfp_run_id: str) -> str:
    c = client()
    exp = experiment_for(pipeline)
    query = f"tags.`{ROLE}` = 'pipeline' and tags.kfp_run_id = '{kfp_run_id}'"
    found = c.search_runs([exp], filter_string=query, order_by=["attributes.start_time ASC"], max_results=1)
    if found:
        return found[0].info.run_id
    return start_pipeline_run(pipeline, {}, tags={"runner": "kfp"}, kfp_run_id=kfp_run_id)


@contextmanager
def step_run(pipeline: str, step: str, parent_run_id: str = "", kfp_run_id: str = "",
             tags: dict[str, str] | None = None) -> Iterator[Any]:
    """A nested run for one step; FAILED (and re-raised) if the step raises."""
    import mlflow

    configure()
    parent = parent_run_id or (_parent_for_kfp_run(pipeline, kfp_run_id) if kfp_run_id else "")
    parent_tags = client().get_run(parent).data.tags if parent else {}
    all_tags = {ROLE: "step", "pipeline": pipeline, "task": step, "kfp_run_id": kfp_run_id,
                "git_commit": git_commit(), **({"data_revision": parent_tags["data_revision"]}
                                                if "data_revision" in parent_tags else {}), **(tags or {})}
    if parent:
        all_tags["mlflow.parentRunId"] = parent
    with mlflow.start_run(experiment_id=experiment_for(pipeline), run_name=step, tags=all_tags) as run:
        try:
            yield run
        except BaseException:
            mlflow.end_run("FAILED")
            raise


def set_data_revision(revision: str, content_hash: str = "") -> None:
    """Record the data revision on the step's run and its parent, so every later step inherits it."""
    import mlflow

    run = mlflow.active_run()
    tags = {"data_revision": revision, **({"data_content_sha256": content_hash} if content_hash else {})}
    mlflow.set_tags(tags)
    parent = run.data.tags.get("mlflow.parentRunId") if run else None
    if parent:
        c = client()
        for k, v in tags.items():
            c.set_tag(parent, k, v)


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    import mlflow

    finite = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and math.isfinite(float(v)):
            finite[k] = float(v)
        else:
            log.warning("not logging metric %s=%r (not a finite number)", k, v)
    if finite and mlflow.active_run():
        mlflow.log_metrics(finite, step=step)


def log_image(image, name: str) -> None:
    import mlflow

    mlflow.log_image(image, artifact_file=name)


def log_html(path: Path, name: str) -> None:
    import mlflow

    mlflow.log_text(Path(path).read_text(), name)


def log_dict(obj: dict, name: str) -> None:
    import mlflow

    mlflow.log_dict(obj, name)


def log_figure(fig, name: str) -> None:
    import mlflow

    mlflow.log_figure(fig, name)


def log_dir(local_dir: Path, artifact_path: str) -> None:
    import mlflow

    mlflow.log_artifacts(str(local_dir), artifact_path)
