"""The one settings object. Every module asks `get_settings()`; none reads the environment itself.

Embedded default: everything under one git-ignored home folder (sqlite MLflow and Optuna, local
artifacts, local KFP pipeline root). Production: point the URIs at PostgreSQL / an MLflow server /
S3 with the matching DISTILLERY_* variables; nothing else changes.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DISTILLERY_", extra="ignore")

    home: Path = Field(Path(".distillery"), description="Folder for all embedded state (git-ignored).")
    data_dir: Path = Field(Path("data"), description="Materialized raw datasets, tracked by data.dvc.")
    sources_dir: Path | None = Field(
        None, description="Folder holding the packed offline sources (the emoji npm tarball); default home/npm. "
                          "The image ships them here, so no step runs npm.")

    tracking_uri: str | None = Field(None, description="MLflow tracking URI; default sqlite under home.")
    registry_uri: str | None = Field(None, description="MLflow registry URI; default = tracking URI.")
    artifact_location: str | None = Field(
        None, description="Default artifact root for new MLflow experiments (path or s3://bucket/prefix)."
    )
    champions_location: str | None = Field(
        None, description="Where promote keeps a stable copy of each champion (<here>/<model>/); default "
                          "s3://<artifact bucket>/champions with an s3:// artifact location, else a folder under home.")
    optuna_storage: str | None = Field(None, description="Optuna RDB storage URL; default sqlite under home.")
    pipeline_root: str | None = Field(None, description="KFP pipeline root; default a folder under home.")

    s3_endpoint_url: str | None = Field(None, description="S3 endpoint (Ceph RGW, MinIO, AWS); credentials come from the standard AWS_* variables.")
    s3_region: str = "us-east-1"

    image: str = Field("localhost/distillery:latest",
                       description="Full image reference (registry/name:tag or @sha256 digest) of every component and CPU predictor.")
    image_gpu: str = Field("localhost/distillery:latest-cuda",
                           description="Full image reference of the CUDA build, used by GPU predictors.")
    image_digest: str | None = Field(None, description="Digest (sha256:...) of `image`, when `image` is a tag; compiled into every task, "
                                     "so runs are tagged with the exact image. An @sha256 reference carries its own.")
    git_commit: str | None = Field(None, description="Commit the image was built from (set in the image at build time).")
    config_map: str = Field("distillery-config", description="ConfigMap whose non-secret settings every pipeline pod gets.")
    credentials_secret: str = Field("distillery-credentials",
                                    description="Secret whose S3/Optuna/MLflow credentials every pipeline pod gets.")
    # The embedded default has no cluster, so it renders; the cluster's ConfigMap sets apply.
    deploy_mode: Literal["apply", "render"] = Field(
        "render", description="apply: deploy creates the InferenceService and waits until Ready (fails if it cannot); "
                              "render: deploy only writes the manifest.")
    deploy_timeout_s: float = Field(600.0, gt=0, description="How long deploy waits for the InferenceService to become Ready.")
    kfp_host: str | None = Field(None, description="KFP API endpoint for submit/schedule.")
    namespace: str = Field("distillery", description="Kubernetes namespace for InferenceServices.")
    kube_context: str | None = Field(None, description="kubectl context; when unset no cluster is assumed.")

    accelerator: str = Field("auto", description="Training accelerator: auto (a CUDA GPU when torch sees one, else CPU), cpu or gpu.")
    devices: int = Field(1, description="Training processes in one pod (GPUs, or CPU processes); more than 1 trains with DDP.")
    strategy: str = Field("auto", description="Lightning strategy; auto is ddp when devices > 1 (gloo on CPU, NCCL on GPUs).")
    precision: str = Field("auto", description="Lightning precision; auto is bf16-mixed on GPUs with bf16, else 32-true. fp16 is refused.")
    cpu_threads: int | None = Field(None, description="torch CPU threads of a step; default: the pod's CPU limit (cgroup quota), else torch's choice.")
    checkpoint_root: str | None = Field(None, description="Where training steps keep their resumable checkpoints (path or s3://bucket/prefix); default a folder under home.")

    # A restarted MLflow server (a new pod, a rollout) refuses connections for seconds: every tracking and registry
    # call retries with exponential backoff (0, 2, 4, ... 64 s with the defaults: about two minutes), then fails
    # the step, which the cluster retries as a whole (platform/pods.py).
    tracking_max_retries: int = Field(7, ge=0, le=10, description="Retries of an MLflow request on connection errors and 429/5xx answers.")
    tracking_backoff_factor: int = Field(1, ge=0, le=10, description="Backoff between MLflow retries: factor * 2^(n-1) seconds (MLflow takes an integer).")
    tracking_timeout_s: float = Field(120.0, gt=0, description="Timeout of one MLflow request, in seconds.")
    # Optuna's storage on PostgreSQL: a call that lost its connection (a restarted database) is retried until
    # the database answers again, at most this long; a worker that died leaves a trial that its heartbeat marks
    # failed after the grace period, and the trial is then run again by another worker.
    sweep_reconnect_s: float = Field(60.0, ge=0, description="How long a sweep waits for its database to come back.")
    sweep_heartbeat_s: int = Field(30, ge=1, description="Heartbeat interval of a running trial, in seconds.")
    sweep_grace_s: int = Field(120, ge=2, description="A running trial without a heartbeat for this long is failed and retried.")
    sweep_trial_retries: int = Field(2, ge=0, description="How often a trial failed by a lost worker is run again.")

    parent_run_id: str | None = Field(None, description="MLflow parent run of the pipeline run in progress (set by `distillery run`).")

    serve_host: str = Field("127.0.0.1", description="Local serving binds here only.")
    serve_port: int = 8080

    @property
    def home_abs(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def resolved_image_digest(self) -> str | None:
        """The digest of `image`: its own for a name@sha256:... reference, else `image_digest`."""
        return self.image.partition("@")[2] or self.image_digest

    @property
    def sources_path(self) -> Path:
        return (self.sources_dir or self.home_abs / "npm").expanduser().resolve()

    @property
    def mlflow_tracking_uri(self) -> str:
        return self.tracking_uri or f"sqlite:///{self.home_abs / 'mlflow.db'}"

    @property
    def mlflow_registry_uri(self) -> str:
        return self.registry_uri or self.mlflow_tracking_uri

    @property
    def mlflow_artifact_location(self) -> str:
        return self.artifact_location or str(self.home_abs / "mlartifacts")

    @property
    def champions_root(self) -> str:
        if self.champions_location:
            return self.champions_location.rstrip("/")
        if self.artifact_location and self.artifact_location.startswith("s3://"):
            return f"s3://{self.artifact_location[5:].split('/', 1)[0]}/champions"
        return str(self.home_abs / "champions")

    @property
    def optuna_storage_url(self) -> str:
        return self.optuna_storage or f"sqlite:///{self.home_abs / 'optuna.db'}"

    @property
    def kfp_pipeline_root(self) -> str:
        return self.pipeline_root or str(self.home_abs / "pipeline_root")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    s = Settings()
    s.home_abs.mkdir(parents=True, exist_ok=True)
    return s
