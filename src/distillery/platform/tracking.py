"""MLflow: one parent run per pipeline run, one nested run per step, tagged for lineage.

Steps run in separate processes (the KFP runner's subprocesses or a cluster's pods). They find their
parent run from the settings (`distillery run` opens it and names it in DISTILLERY_PARENT_RUN_ID) or,
on a cluster, by the KFP run id: a step that finds none creates one, steps that start together may each
create one, and all take the oldest once it has settled (`PARENT_SETTLE_S`); the others are deleted.
Everything switches by settings alone: sqlite + local artifacts by default, an MLflow server with an
s3:// artifact root (any S3 endpoint) in production.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from distillery.settings import get_settings

log = logging.getLogger(__name__)

ROLE = "distillery.role"
PARENT_TAG = "mlflow.parentRunId"
TERMINAL = ("FINISHED", "FAILED", "KILLED")


def configure() -> None:
    """Point MLflow at the configured tracking and registry stores (idempotent, cheap to call again)."""
    import mlflow

    s = get_settings()
    if s.s3_endpoint_url:
        # MLflow's S3 artifact repository takes its endpoint from this variable only; we set it, never read it.
        os.environ["MLFLOW_S3_ENDPOINT_URL"] = s.s3_endpoint_url
    # MLflow's REST client retries connection errors and 429/5xx answers with urllib3's exponential backoff; it
    # reads its bounds from these variables on every request, so a restarted server is waited for, not fatal.
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(s.tracking_max_retries)
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = str(s.tracking_backoff_factor)
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(s.tracking_timeout_s))
    if mlflow.get_tracking_uri() != s.mlflow_tracking_uri:
        mlflow.set_tracking_uri(s.mlflow_tracking_uri)
    if mlflow.get_registry_uri() != s.mlflow_registry_uri:
        mlflow.set_registry_uri(s.mlflow_registry_uri)


def tracking_uri() -> str:
    return get_settings().mlflow_tracking_uri


def client():
    from mlflow import MlflowClient

    configure()
    s = get_settings()
    return MlflowClient(tracking_uri=s.mlflow_tracking_uri, registry_uri=s.mlflow_registry_uri)


# Without it the MLflow UI guesses the experiment's kind and opens ours in its GenAI view (traces, tokens).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def experiment_for(pipeline: str) -> str:
    """The experiment `distillery/<pipeline>`, created with artifact root `<artifact_location>/<pipeline>`."""
    from mlflow.entities import LifecycleStage

    if not pipeline or "/" in pipeline:
        raise ValueError(f"pipeline name must be a non-empty name without '/', got {pipeline!r}")
    c = client()
    name = f"distillery/{pipeline}"
    for _ in range(3):
        exp = c.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == LifecycleStage.DELETED:
                c.restore_experiment(exp.experiment_id)  # a deleted experiment would refuse every new run
            if exp.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
                c.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
            return exp.experiment_id
        root = get_settings().mlflow_artifact_location.rstrip("/")
        try:
            return c.create_experiment(name, artifact_location=f"{root}/{pipeline}",
                                       tags={"pipeline": pipeline, EXPERIMENT_KIND[0]: EXPERIMENT_KIND[1]})
        except Exception:  # noqa: BLE001 - another process created it at the same moment: look again
            time.sleep(0.2)
    raise RuntimeError(f"could not create or find the MLflow experiment {name} in {tracking_uri()}")


def git_commit() -> str:
    """The commit the code runs from: DISTILLERY_GIT_COMMIT (set in the image at build time), else the checkout's
    HEAD, else "unknown" (neither an image build nor a git checkout)."""
    return get_settings().git_commit or _checkout_head()


def lineage_tags() -> dict[str, str]:
    """Tags every run gets: the code's commit and, in a compiled task, the image reference and digest."""
    s = get_settings()
    tags = {"git_commit": git_commit()}
    if digest := s.resolved_image_digest:
        tags.update(image=s.image, image_digest=digest)
    return tags


@functools.lru_cache(maxsize=1)
def _checkout_head() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _flat(params: dict[str, Any]) -> dict[str, str]:
    return {k: (json.dumps(v) if isinstance(v, (dict, list, tuple)) else str(v))[:6000] for k, v in params.items()}


def start_pipeline_run(pipeline: str, params: dict[str, Any], tags: dict[str, str] | None = None,
                       kfp_run_id: str = "") -> str:
    """Open the parent run of one pipeline run; it stays RUNNING until `finish_pipeline_run`."""
    from mlflow.entities import Param

    c = client()
    run = c.create_run(experiment_for(pipeline), run_name=pipeline,
                       tags={ROLE: "pipeline", "pipeline": pipeline, "kfp_run_id": kfp_run_id,
                             **lineage_tags(), **{k: str(v) for k, v in (tags or {}).items()}})
    flat = list(_flat(params).items())
    for i in range(0, len(flat), 100):  # log_batch takes at most 100 params per call
        c.log_batch(run.info.run_id, params=[Param(k, v) for k, v in flat[i:i + 100]])
    return run.info.run_id


def finish_pipeline_run(run_id: str, status: str = "FINISHED") -> None:
    if status not in TERMINAL:
        raise ValueError(f"status must be one of {TERMINAL}, got {status!r}")
    client().set_terminated(run_id, status)


# KFP's final task states (PipelineTaskFinalStatus.state) -> MLflow run statuses.
KFP_FINAL_STATE = {"SUCCEEDED": "FINISHED", "CANCELLED": "KILLED", "CANCELED": "KILLED"}


def finish_kfp_run(pipeline: str, kfp_run_id: str, state: str, error: str = "") -> str:
    """The exit handler's work: end the parent run of this pipeline run with the pipeline's final state (any
    state but success and cancellation is FAILED). Returns the parent's id, or "" when no step ever opened one."""
    parent = get_settings().parent_run_id
    c = client()
    if not parent and kfp_run_id:
        found = _parents_for_kfp_run(c, experiment_for(pipeline), kfp_run_id)
        parent = found[0].info.run_id if found else ""
    if not parent:
        return ""
    c.set_tag(parent, "kfp_final_state", state)
    if error:
        c.set_tag(parent, "kfp_error", error[:5000])
    finish_pipeline_run(parent, KFP_FINAL_STATE.get(state.upper(), "FAILED"))
    return parent


def _parents_for_kfp_run(c, exp: str, kfp_run_id: str) -> list:
    query = f"tags.`{ROLE}` = 'pipeline' and tags.kfp_run_id = '{kfp_run_id}'"
    runs = c.search_runs([exp], filter_string=query, max_results=50)
    return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))


# A parent is trusted once it is this old. Steps that race each create one; a run's start time is taken before it
# is inserted, so a racer's older parent may appear after a look that missed it. Once the oldest parent seen is
# older than any insert takes, no older one can still appear, and every step agrees on it.
PARENT_SETTLE_S = 3.0


def _parent_for_kfp_run(pipeline: str, kfp_run_id: str) -> str:
    """Find-or-create the parent run of a KFP run. Steps may race: each that found none creates one, every step
    takes the oldest parent once it has settled, and a duplicate is deleted by the process that made it."""
    if "'" in kfp_run_id:
        raise ValueError(f"kfp_run_id must not contain quotes, got {kfp_run_id!r}")
    c = client()
    exp = experiment_for(pipeline)
    found = _parents_for_kfp_run(c, exp, kfp_run_id)
    mine = "" if found else start_pipeline_run(pipeline, {}, tags={"runner": "kfp"}, kfp_run_id=kfp_run_id)
    deadline = time.monotonic() + 10 * PARENT_SETTLE_S  # a pod with a skewed clock must not wait forever
    while True:
        found = _parents_for_kfp_run(c, exp, kfp_run_id)
        age = time.time() - found[0].info.start_time / 1000 if found else 0.0
        if found and (age >= PARENT_SETTLE_S or time.monotonic() >= deadline):
            break
        if time.monotonic() >= deadline:
            raise LookupError(f"the parent run of KFP run {kfp_run_id!r} vanished from {tracking_uri()}")
        time.sleep(min(max(PARENT_SETTLE_S - age, 0.05), PARENT_SETTLE_S))
    winner = found[0].info.run_id
    if mine and winner != mine:
        c.delete_run(mine)
    return winner


def _run_tags(c, run_id: str) -> dict[str, str]:
    from mlflow.exceptions import MlflowException

    try:
        return c.get_run(run_id).data.tags
    except MlflowException as e:
        raise LookupError(f"parent run {run_id!r} not found in {tracking_uri()}: the parent run id (e.g. "
                          "DISTILLERY_PARENT_RUN_ID) must come from the same tracking store") from e


@contextmanager
def step_run(pipeline: str, step: str, parent_run_id: str = "", kfp_run_id: str = "",
             tags: dict[str, str] | None = None) -> Iterator[Any]:
    """A nested run for one step, made the active MLflow run; FAILED (and re-raised) if the step raises.

    Tags: pipeline, task, kfp_run_id, git_commit (and image, image_digest in the image), data_revision (inherited from the parent once the data
    step recorded it, or given in `tags`), mlflow.parentRunId.
    """
    import mlflow
    from mlflow.tracking.context import registry as context_registry

    c = client()
    parent = parent_run_id or (_parent_for_kfp_run(pipeline, kfp_run_id) if kfp_run_id else "")
    parent_tags = _run_tags(c, parent) if parent else {}
    all_tags = {ROLE: "step", "pipeline": pipeline, "task": step, "kfp_run_id": kfp_run_id, **lineage_tags()}
    for inherited in ("data_revision", "data_content_sha256"):
        if inherited in parent_tags:
            all_tags[inherited] = parent_tags[inherited]
    all_tags.update({k: str(v) for k, v in (tags or {}).items()})
    if parent:
        all_tags[PARENT_TAG] = parent
    all_tags = context_registry.resolve_tags(all_tags)
    # Created by the client and then activated: this keeps our parent even if another run is active here.
    created = c.create_run(experiment_for(pipeline), run_name=step, tags=all_tags)
    with mlflow.start_run(run_id=created.info.run_id, nested=mlflow.active_run() is not None) as run:
        try:
            yield run
        except BaseException as e:
            mlflow.set_tag("error", f"{type(e).__name__}: {e}"[:5000])
            mlflow.end_run("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise


def set_data_revision(revision: str, content_hash: str = "", run_id: str | None = None, dataset: str = "") -> None:
    """Record the data revision on the step's run and on its parent, so every later step inherits it. With a
    `dataset` name it is also logged on both as an MLflow dataset input (shown in the UI's run pages and
    comparisons) whose source is the DVC revision and content hash."""
    import mlflow
    from mlflow.entities import Dataset, DatasetInput, InputTag

    c = client()
    if run_id is None:
        active = mlflow.active_run()
        if active is None:
            raise RuntimeError("set_data_revision needs an active step run (inside step_run) or an explicit run_id")
        run_id = active.info.run_id
    tags = {"data_revision": revision, **({"data_content_sha256": content_hash} if content_hash else {})}
    parent = c.get_run(run_id).data.tags.get(PARENT_TAG)
    for rid in filter(None, (run_id, parent)):
        for k, v in tags.items():
            c.set_tag(rid, k, v)
        if dataset:
            source = json.dumps({"dvc_md5": revision, "content_sha256": content_hash})
            entity = Dataset(name=dataset, digest=(content_hash or revision)[:36], source_type="dvc", source=source)
            c.log_inputs(rid, datasets=[DatasetInput(entity, tags=[InputTag("mlflow.data.context", "training")])])


def log_metrics(metrics: dict[str, float], step: int | None = None) -> dict[str, float]:
    """Log the finite numbers of `metrics` to the active run; NaN/inf/non-numbers are skipped with a warning.
    Returns what was logged."""
    import mlflow

    finite = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            finite[k] = float(v)
        elif isinstance(v, bool):
            finite[k] = float(v)
        else:
            log.warning("not logging metric %s=%r (not a finite number)", k, v)
    if finite and mlflow.active_run():
        mlflow.log_metrics(finite, step=step)
    return finite


def log_image(image, name: str) -> None:
    import mlflow

    mlflow.log_image(image, artifact_file=name)


def log_html(html: Path | str, name: str) -> None:
    """Log an HTML report given as a file path or as the HTML text itself."""
    import mlflow

    is_path = isinstance(html, Path) or ("<" not in html and len(html) < 1024 and Path(html).is_file())
    text = Path(html).read_text() if is_path else html
    mlflow.log_text(text, name if name.endswith((".html", ".htm")) else f"{name}.html")


def log_dict(obj: dict, name: str) -> None:
    import mlflow

    mlflow.log_dict(obj, name)


def log_figure(fig, name: str) -> None:
    import matplotlib.pyplot as plt
    import mlflow

    mlflow.log_figure(fig, name)
    plt.close(fig)  # steps log many figures; pyplot would keep every one alive


def log_dir(local_dir: Path, artifact_path: str) -> None:
    import mlflow

    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise NotADirectoryError(f"log_dir needs a folder, {local_dir} is not one")
    mlflow.log_artifacts(str(local_dir), artifact_path)
