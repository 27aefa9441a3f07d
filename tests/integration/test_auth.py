"""The MLflow server as the cluster runs it: MLflow's basic-auth app with the auth config of manifests/base (its
user store on PostgreSQL, the password from PGPASSWORD, the admin's from the environment). Anonymous requests get
401; the configured user works through the project's client; a step run with credentials in its environment
leaves none of them in the run's params or tags, nor in its log."""

from __future__ import annotations

import base64
import os
import secrets
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import yaml
from sqlalchemy.engine import make_url

from conftest import REPO
from integration import services

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEP = """
import logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO)
from distillery.platform import tracking
from distillery.platform.stepping import run_step
from distillery.steps import release

parent = tracking.start_pipeline_run("itest-auth", {"profile": "smoke"})
import os
from distillery.settings import get_settings
os.environ["DISTILLERY_PARENT_RUN_ID"] = parent  # as `distillery run` hands it to its steps
get_settings.cache_clear()
model = Path(sys.argv[1])
(model / "unet").mkdir(parents=True)
(model / "model_index.json").write_text("{}")
(model / "unet" / "weights.safetensors").write_bytes(b"0" * 1000)
out = run_step(release.register, pipeline="itest-auth", step="register", model_dir=str(model),
               metrics={"fd": 1.0}, model_name="itest-auth")
tracking.finish_pipeline_run(parent)
print("parent", parent, "version", out["version"], flush=True)
"""


def _auth_ini(pg: services.Postgres) -> tuple[str, str]:
    """The cluster's basic_auth.ini with its user store pointed at a database of `pg` (no password in the URL, as
    in the cluster); returns (ini text, that database's password for PGPASSWORD)."""
    docs = list(yaml.safe_load_all((REPO / "manifests" / "base" / "mlflow.yaml").read_text()))
    ini = next(d for d in docs if d["metadata"]["name"] == "mlflow-auth")["data"]["basic_auth.ini"]
    url = make_url(pg.create_database("mlflow_auth"))
    cluster_uri = next(line.split("=", 1)[1].strip() for line in ini.splitlines() if line.startswith("database_uri"))
    assert make_url(cluster_uri).password is None
    local = f"postgresql+psycopg2://{url.username}@{url.host}:{url.port}/{url.database}"
    return ini.replace(cluster_uri, local), url.password


def test_basic_auth_refuses_anonymous_and_no_credential_reaches_runs_or_logs(monkeypatch, s3, postgres_server,
                                                                           tmp_path):
    from mlflow.exceptions import MlflowException

    ini, pg_password = _auth_ini(postgres_server)
    (tmp_path / "basic_auth.ini").write_text(ini)
    admin_password = secrets.token_urlsafe(18)
    optuna_url = postgres_server.create_database("optuna_auth")
    server = services.start_mlflow(f"sqlite:///{tmp_path / 'mlflow.db'}", f"s3://{s3.bucket}/auth-proxied", s3.server, {
        "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "basic_auth.ini"), "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16), "PGPASSWORD": pg_password})
    try:
        def status(auth: str | None) -> int:
            req = urllib.request.Request(f"{server.url}/api/2.0/mlflow/experiments/search?max_results=1")
            if auth:
                req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
            try:
                return urllib.request.urlopen(req, timeout=30).status
            except urllib.error.HTTPError as e:
                return e.code

        assert status(None) == 401
        assert status(f"admin:{admin_password}x") == 401
        assert status(f"admin:{admin_password}") == 200
        assert urllib.request.urlopen(f"{server.url}/health", timeout=10).status == 200  # the readiness probe

        # The project's client: refused without credentials ...
        from distillery.settings import get_settings

        for var in [v for v in os.environ if v.startswith("DISTILLERY_")]:
            monkeypatch.delenv(var)
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
        env = {"DISTILLERY_HOME": str(tmp_path / "home"), "DISTILLERY_TRACKING_URI": server.url,
               "DISTILLERY_ARTIFACT_LOCATION": f"s3://{s3.bucket}/auth-artifacts",
               "DISTILLERY_S3_ENDPOINT_URL": s3.endpoint_url, "DISTILLERY_OPTUNA_STORAGE": optuna_url,
               "AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("DISTILLERY_TRACKING_MAX_RETRIES", "0")
        get_settings.cache_clear()
        from distillery.platform import tracking

        with pytest.raises(MlflowException, match="401"):
            tracking.client().search_experiments()

        # ... and let in with MLFLOW_TRACKING_USERNAME/PASSWORD, as a pipeline pod gets them from the Secret.
        creds = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": admin_password}
        step = subprocess.run([sys.executable, "-c", STEP, str(tmp_path / "model")], cwd=REPO, capture_output=True,
                              text=True, timeout=600, env={**os.environ, **env, **creds,
                                                           "PYTHONPATH": str(REPO / "src")})
        log = step.stdout + step.stderr
        assert step.returncode == 0, log[-3000:]
        parent = log.split("parent ", 1)[1].split()[0]

        for k, v in creds.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("DISTILLERY_TRACKING_MAX_RETRIES", "3")
        get_settings.cache_clear()
        c = tracking.client()
        runs = [c.get_run(parent), *c.search_runs([tracking.experiment_for("itest-auth")],
                                                  f"tags.`mlflow.parentRunId` = '{parent}'")]
        assert [r.info.run_name for r in runs] == ["itest-auth", "register"]
        assert all(r.info.status == "FINISHED" for r in runs)
        (version,) = c.search_model_versions("name='itest-auth'")

        pg_url_password = make_url(optuna_url).password
        basic = base64.b64encode(f"admin:{admin_password}".encode()).decode()
        credentials = {"AWS secret key": s3.secret_key, "AWS access key id": s3.access_key,
                       "MLflow password": admin_password, "basic-auth header": basic,
                       "PostgreSQL password": pg_url_password}
        recorded = "\n".join([*(f"{k}={v}" for r in runs for k, v in {**r.data.params, **r.data.tags}.items()),
                              *(f"{k}={v}" for k, v in version.tags.items()), version.source])
        assert "register" in recorded and "fd" in recorded  # the params and tags are really there
        for what, secret in credentials.items():
            assert secret not in recorded, f"{what} logged in an MLflow run"
            assert secret not in log, f"{what} in the step's log"
    finally:
        server.stop()
