"""Session-wide real servers on 127.0.0.1 (started once, stopped at the end) and a settings environment that
points the platform at them. A missing server binary fails the fixture with the command that installs it."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from integration import services


@dataclass(frozen=True)
class S3:
    endpoint_url: str
    access_key: str
    secret_key: str
    bucket: str
    server: services.CephRGW

    def client(self):
        return self.server.client()

    def keys(self, prefix: str = "") -> list[str]:
        return self.server.keys(prefix)


@dataclass(frozen=True)
class MlflowServer:
    url: str
    backend_uri: str  # postgresql+psycopg2://... of its own database
    artifacts_destination: str  # where `mlflow-artifacts:/` (proxied) artifacts land
    server: services.MlflowServer  # its process: `server.restart()` brings it back on the same URL


@pytest.fixture(scope="session")
def postgres_server():
    pg = services.start_postgres()
    yield pg
    pg.stop()


@pytest.fixture(scope="session")
def postgres(postgres_server) -> str:
    """URL of a database `distillery` (its own role and random password) on the session's PostgreSQL."""
    return postgres_server.create_database("distillery")


@pytest.fixture(scope="session")
def s3() -> S3:
    rgw = services.start_ceph_rgw(bucket="distillery")
    yield S3(rgw.endpoint_url, rgw.access_key, rgw.secret_key, rgw.bucket, rgw)
    rgw.stop()


@pytest.fixture(scope="session")
def mlflow_server(postgres_server, s3) -> MlflowServer:
    backend = postgres_server.create_database("mlflow")
    destination = f"s3://{s3.bucket}/mlflow-proxied"
    server = services.start_mlflow(backend, destination, s3.server)
    yield MlflowServer(server.url, backend, destination, server)
    server.stop()


@pytest.fixture
def s3_env(monkeypatch, tmp_path, s3):
    """Settings with S3 on the RGW (credentials through the standard AWS_* variables)."""
    from distillery.settings import get_settings

    monkeypatch.setenv("DISTILLERY_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DISTILLERY_S3_ENDPOINT_URL", s3.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    # tracking.configure() exports this for MLflow's S3 client; monkeypatch restores it after the test.
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3.endpoint_url)
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


@pytest.fixture
def production(monkeypatch, s3_env, s3, mlflow_server):
    """The production configuration: MLflow server on PostgreSQL, run artifacts and models on S3."""
    from distillery.settings import get_settings

    monkeypatch.setenv("DISTILLERY_TRACKING_URI", mlflow_server.url)
    monkeypatch.setenv("DISTILLERY_ARTIFACT_LOCATION", f"s3://{s3.bucket}/artifacts")
    monkeypatch.delenv("DISTILLERY_REGISTRY_URI", raising=False)
    monkeypatch.delenv("DISTILLERY_PARENT_RUN_ID", raising=False)
    get_settings.cache_clear()
    yield get_settings()
    import mlflow

    while mlflow.active_run():  # a failed test must not leave a run of the server active for the next test
        mlflow.end_run("FAILED")
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def image():
    """The project image (`make image`; rebuilt only when its inputs changed)."""
    from integration.containers import build_image

    return build_image()
