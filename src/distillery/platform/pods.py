"""How every pipeline task runs as a Kubernetes pod: settings from the ConfigMap, credentials from the Secret,
the image, resources, accelerators, retries and timeouts. The one place for names and key->env mappings;
`manifests/base` defines the ConfigMap with the same keys and documents the Secret."""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Iterator

from distillery.settings import get_settings

# ConfigMap key -> env var. Non-secret only: what a pod needs to reach the servers and deploy.
CONFIG_ENV: dict[str, str] = {k: k for k in (
    "DISTILLERY_HOME",  # a writable folder in the pod (the image's /app is read-only for uid 1000)
    "DISTILLERY_TRACKING_URI",
    "DISTILLERY_ARTIFACT_LOCATION",
    "DISTILLERY_S3_ENDPOINT_URL",
    "MLFLOW_S3_ENDPOINT_URL",
    "DISTILLERY_PIPELINE_ROOT",
    "DISTILLERY_NAMESPACE",
    "DISTILLERY_DEPLOY_MODE",
    "DISTILLERY_DEPLOY_TIMEOUT_S",
)}
# Secret key -> env var. The Secret must hold these (see manifests/README.md for `kubectl create secret`).
SECRET_ENV: dict[str, str] = {k: k for k in (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "DISTILLERY_OPTUNA_STORAGE",  # postgresql://user:password@host/db: the URL carries the password
)}
# Only when the MLflow server has basic auth on.
SECRET_ENV_OPTIONAL: dict[str, str] = {k: k for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}

# Steps that train or run the models; the rest read/write small files and talk to the servers.
COMPUTE_STEPS = frozenset({
    "train-feature-net", "train-vae", "train-unet", "train-policy", "sweep-worker", "distill",
    "collect-demos", "evaluate-text-to-image", "evaluate-policies", "evaluate-students", "train-navigation",
    "evaluate-navigation", "score-layers", "prune-unet", "distill-small", "train-tiny-vae", "evaluate-hybrid",
    "train-teacher", "teacher-rollouts", "sweep-prior-weights", "train-student", "evaluate-locomotion",
    "train-addon", "evaluate-addon", "evaluate-serving",
})
# Of those, the ones that get an accelerator in a GPU profile (evaluation samples the diffusion models too;
# navigation and locomotion are evaluated by stepping simulators, on CPU).
ACCELERATOR_STEPS = COMPUTE_STEPS - {"collect-demos", "evaluate-navigation", "teacher-rollouts", "evaluate-locomotion"}
ACCELERATOR = "nvidia.com/gpu"

# Every task's pod carries this label: the NetworkPolicies of manifests/base let only such pods (and the MLflow
# server) reach PostgreSQL, and only them (and the ingress) reach the MLflow server.
POD_LABEL = ("distillery/role", "pipeline-step")


@dataclass(frozen=True)
class Resources:
    cpu_request: str
    cpu_limit: str
    memory_request: str
    memory_limit: str
    timeout_s: int


LIGHT = Resources("500m", "2", "1Gi", "4Gi", timeout_s=60 * 60)
COMPUTE = Resources("2", "4", "4Gi", "16Gi", timeout_s=12 * 60 * 60)
COMPUTE_GPU = Resources("4", "8", "16Gi", "48Gi", timeout_s=72 * 60 * 60)

# Every step talks to the MLflow server (and some to PostgreSQL / the object store): a restarted pod
# retries transient server errors; the step resumes from its checkpoints on the object store.
RETRIES, BACKOFF, BACKOFF_FACTOR, BACKOFF_MAX = 3, "30s", 2.0, "1800s"

# How the graph being built is meant to run: (for a cluster, gpu). Outside `cluster_build` (the graph built at
# import, run by the local runner) tasks get no retries: the local runner honours them, and a failing local
# step would rerun after minutes of backoff.
_build: contextvars.ContextVar[tuple[bool, bool]] = contextvars.ContextVar("distillery_pods_build",
                                                                          default=(False, False))


@contextlib.contextmanager
def cluster_build(gpu: bool) -> Iterator[None]:
    """Pipelines built inside this context are for a cluster: retries on, accelerators when `gpu`."""
    token = _build.set((True, gpu))
    try:
        yield
    finally:
        _build.reset(token)


def step_kind(component_name: str) -> str:
    return "compute" if component_name in COMPUTE_STEPS else "light"


def configure_pipeline_tasks() -> None:
    """Configure every container task of the pipeline being defined; call it last in a pipeline function."""
    from kfp.dsl import pipeline_context

    pipeline = pipeline_context.Pipeline.get_default_pipeline()
    if pipeline is None:
        raise RuntimeError("configure_pipeline_tasks() must be called inside a @dsl.pipeline function")
    for task in pipeline.tasks.values():
        if task.container_spec is not None:  # importer tasks have no container
            configure_task(task)


def configure_task(task):
    from kfp import kubernetes

    s = get_settings()
    cluster, gpu = _build.get()
    name = task.component_spec.name
    compute = step_kind(name) == "compute"
    accel = gpu and name in ACCELERATOR_STEPS
    r = (COMPUTE_GPU if accel else COMPUTE) if compute else LIGHT

    kubernetes.use_config_map_as_env(task, s.config_map, CONFIG_ENV)
    kubernetes.use_secret_as_env(task, s.credentials_secret, SECRET_ENV)
    kubernetes.use_secret_as_env(task, s.credentials_secret, SECRET_ENV_OPTIONAL, optional=True)
    # The deploy step names the same images the pipeline was compiled with.
    task.set_env_variable("DISTILLERY_IMAGE", s.image)
    task.set_env_variable("DISTILLERY_IMAGE_GPU", s.image_gpu)
    if digest := s.resolved_image_digest:  # every run is tagged with the exact image it ran in
        task.set_env_variable("DISTILLERY_IMAGE_DIGEST", digest)
    task.set_cpu_request(r.cpu_request).set_cpu_limit(r.cpu_limit)
    task.set_memory_request(r.memory_request).set_memory_limit(r.memory_limit)
    if accel:
        task.set_accelerator_type(ACCELERATOR).set_accelerator_limit(1)
    if cluster:
        task.set_retry(RETRIES, backoff_duration=BACKOFF, backoff_factor=BACKOFF_FACTOR, backoff_max_duration=BACKOFF_MAX)
    kubernetes.set_timeout(task, r.timeout_s)
    kubernetes.set_security_context(task, run_as_user=1000, run_as_group=1000, run_as_non_root=True)
    kubernetes.add_pod_label(task, *POD_LABEL)
    return task
