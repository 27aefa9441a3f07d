"""Session-wide real servers on 127.0.0.1 (started once, stopped at the end) and a settings environment that
points the platform at them. A missing server binary fails the fixture with the command that installs it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from integration import services
from integration.containers import REPO, pod_env, podman_env


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


@pytest.fixture(scope="session")
def docker_api(tmp_path_factory):
    """`podman system service` as the Docker API for kfp.local.DockerRunner."""
    sock = tmp_path_factory.mktemp("podman") / "docker.sock"
    proc = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{sock}"], env=podman_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while not sock.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert sock.exists(), "podman system service did not open its socket"
    yield f"unix://{sock}"
    proc.terminate()
    proc.wait(15)


@pytest.fixture(scope="module")
def cluster_like(tmp_path_factory, image, docker_api, postgres_server, s3, mlflow_server):
    """(run(pipeline, overrides) -> seconds, the MLflow client of the server, the pod env); one per test module,
    so a module may run its pipeline once in a fixture and check it in several tests."""
    from kfp import local

    tmp_path = tmp_path_factory.mktemp("cluster")
    root = tmp_path / "pipeline_root"
    root.mkdir()
    root.chmod(0o777)  # the one shared folder; the containers write it as uid 1000
    optuna = postgres_server.create_database(f"optuna_ct_{os.getpid()}_{time.time_ns() % 10**6}",
                                             driver="postgresql")  # no driver named: the pods must cope
    env = pod_env(tmp_path,
                   {"DISTILLERY_TRACKING_URI": mlflow_server.url,
                    "DISTILLERY_ARTIFACT_LOCATION": f"s3://{s3.bucket}/artifacts",
                    "DISTILLERY_S3_ENDPOINT_URL": s3.endpoint_url, "MLFLOW_S3_ENDPOINT_URL": s3.endpoint_url,
                    "DISTILLERY_PIPELINE_ROOT": str(root), "DISTILLERY_HOME": "/tmp/distillery",
                    "DISTILLERY_DEPLOY_MODE": "render"},
                   {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key,
                    "DISTILLERY_OPTUNA_STORAGE": optuna})
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("DOCKER_HOST", docker_api)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.setenv(key, env[key])  # the client reads run artifacts straight from RGW, as a user would

    def run(pipeline: str, overrides: dict) -> float:
        compiled = tmp_path / "compiled" / pipeline
        # Compiled as for a cluster (the cpu profile: smoke is refused), run with the smoke profile's sizes and gates.
        cli = subprocess.run([str(Path(sys.executable).parent / "distillery"), "compile", pipeline, "--profile",
                              "cpu", "--out", str(compiled)], capture_output=True, text=True, cwd=REPO,
                             env={**os.environ, "DISTILLERY_IMAGE": image.ref,
                                  "DISTILLERY_IMAGE_DIGEST": f"sha256:{image.id}",
                                  "DISTILLERY_HOME": str(tmp_path / "compile-home")})
        assert cli.returncode == 0, cli.stdout + cli.stderr
        spec = next(yaml.safe_load_all((compiled / f"{pipeline}.yaml").read_text()))  # then the platform spec
        images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values() if "container" in e}
        assert images == {image.ref}, images
        from distillery.platform import kfp_runtime

        func = kfp_runtime.load_compiled(compiled / f"{pipeline}.yaml")
        local.init(runner=local.DockerRunner(network_mode="host", user="1000", environment=env),
                   pipeline_root=str(root), raise_on_error=True)
        from pipelines.params import PROFILES

        start = time.perf_counter()
        func(**{**PROFILES[pipeline]["smoke"], **overrides})
        return time.perf_counter() - start

    import mlflow

    yield run, mlflow.MlflowClient(tracking_uri=mlflow_server.url), env
    monkeypatch.undo()
