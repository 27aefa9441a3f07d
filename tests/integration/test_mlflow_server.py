"""MLflow tracking server on PostgreSQL with artifacts on Ceph RGW, driven through distillery.platform: runs,
metrics and registry rows must really be in PostgreSQL, artifact bytes really in the bucket."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _pg(url: str):
    import psycopg2
    from sqlalchemy.engine import make_url

    u = make_url(url)
    return psycopg2.connect(host=u.host, port=u.port, user=u.username, password=u.password, dbname=u.database)


def _model_folder(root: Path) -> dict[str, bytes]:
    files = {"model_index.json": b'{"_class_name": "Demo"}', "unet/config.json": b'{"in_channels": 4}',
             "unet/diffusion_pytorch_model.safetensors": os.urandom(300_000)}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def _read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_runs_metrics_artifacts_and_registry_on_postgres_and_s3(production, monkeypatch, mlflow_server, s3, tmp_path):
    import mlflow

    from distillery.platform import registry, tracking
    from distillery.platform.stepping import run_step
    from distillery.settings import get_settings

    pipeline = "itest"
    parent = tracking.start_pipeline_run(pipeline, {"lr": 0.01, "unet": {"channels": [8, 16]}})
    ckpt = tmp_path / "ckpt"
    logged = _model_folder(ckpt)
    with tracking.step_run(pipeline, "train", parent_run_id=parent, kfp_run_id="kfp-itest",
                           tags={"data_revision": "rev-1"}) as run:
        train_run = run.info.run_id
        for step, loss in enumerate([0.9, 0.5, 0.25]):
            tracking.log_metrics({"loss": loss}, step=step)
        tracking.log_dir(ckpt, "checkpoint")
        v1 = registry.register_dir("itest-model", ckpt, train_run, metrics={"fd": 3.5},
                                   tags={"parent_run_id": parent})

    # A step the way components run it: the parent run comes from the settings.
    monkeypatch.setenv("DISTILLERY_PARENT_RUN_ID", parent)
    get_settings.cache_clear()
    result = run_step(lambda: {"fd": 3.5, "passed": True}, pipeline=pipeline, step="evaluate", kfp_run_id="kfp-itest")
    assert result["fd"] == 3.5
    tracking.finish_pipeline_run(parent)

    # The artifact folder reads back byte-identical through the tracking server's client ...
    got = Path(mlflow.artifacts.download_artifacts(run_id=train_run, artifact_path="checkpoint",
                                                   dst_path=str(tmp_path / "back"), tracking_uri=mlflow_server.url))
    assert _read_tree(got) == logged

    # ... because the bytes are in the RGW bucket, under the experiment's s3:// artifact root.
    artifact_uri = tracking.client().get_run(train_run).info.artifact_uri
    assert artifact_uri == f"s3://{s3.bucket}/artifacts/{pipeline}/{train_run}/artifacts"
    prefix = f"artifacts/{pipeline}/{train_run}/artifacts/"
    keys = set(s3.keys(prefix))
    assert {prefix + "checkpoint/" + rel for rel in logged} <= keys
    assert {prefix + "model/" + rel for rel in logged} <= keys  # the registered copy
    body = s3.client().get_object(Bucket=s3.bucket, Key=prefix + "checkpoint/unet/diffusion_pytorch_model.safetensors")
    assert body["Body"].read() == logged["unet/diffusion_pytorch_model.safetensors"]

    # Runs, nesting, tags, metrics and registry rows live in PostgreSQL.
    with _pg(mlflow_server.backend_uri) as conn, conn.cursor() as cur:
        cur.execute("SELECT r.name, r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                    "WHERE t.key = 'mlflow.parentRunId' AND t.value = %s ORDER BY r.name", (parent,))
        assert cur.fetchall() == [("evaluate", "FINISHED"), ("train", "FINISHED")]
        cur.execute("SELECT status FROM runs WHERE run_uuid = %s", (parent,))
        assert cur.fetchone() == ("FINISHED",)
        cur.execute("SELECT step, value FROM metrics WHERE run_uuid = %s AND key = 'loss' ORDER BY step", (train_run,))
        assert cur.fetchall() == [(0, 0.9), (1, 0.5), (2, 0.25)]
        cur.execute("SELECT key, value FROM tags WHERE run_uuid = %s AND key IN ('task', 'kfp_run_id', "
                    "'data_revision', 'pipeline') ORDER BY key", (train_run,))
        assert cur.fetchall() == [("data_revision", "rev-1"), ("kfp_run_id", "kfp-itest"), ("pipeline", pipeline),
                                  ("task", "train")]
        cur.execute("SELECT value FROM params WHERE run_uuid = %s AND key = 'unet'", (parent,))
        assert cur.fetchone() == ('{"channels": [8, 16]}',)
        cur.execute("SELECT source FROM model_versions WHERE name = 'itest-model' AND version = %s", (int(v1),))
        assert cur.fetchone() == (f"{artifact_uri}/model",)

    # Registry: champion alias, models:/NAME@champion download, a second version and rollback.
    registry.promote("itest-model", v1)
    assert registry.storage_uri("itest-model", v1) == f"{artifact_uri}/model"
    assert _read_tree(registry.download("itest-model", "champion", dst=tmp_path / "champ")) == logged
    assert registry.champion_metrics("itest-model") == {"fd": 3.5}
    with tracking.step_run(pipeline, "train-again", parent_run_id=parent) as run:
        v2 = registry.register_dir("itest-model", ckpt, run.info.run_id, metrics={"fd": 2.0})
    registry.promote("itest-model", v2)
    assert registry.champion("itest-model").version == v2
    assert registry.rollback("itest-model") == v1
    with _pg(mlflow_server.backend_uri) as conn, conn.cursor() as cur:
        cur.execute("SELECT alias, version FROM registered_model_aliases WHERE name = 'itest-model' ORDER BY alias")
        assert cur.fetchall() == [("champion", int(v1))]


def test_proxied_artifacts_land_in_the_bucket(production, mlflow_server, s3, tmp_path):
    """An experiment created without an artifact location uses the server's mlflow-artifacts:/ proxy, which writes
    to --artifacts-destination on S3: clients then need no S3 credentials at all."""
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=mlflow_server.url)
    exp = c.create_experiment("itest-proxied")
    assert c.get_experiment(exp).artifact_location.startswith("mlflow-artifacts:")
    run = c.create_run(exp)
    (tmp_path / "report.txt").write_bytes(b"proxied through the tracking server\n")
    c.log_artifact(run.info.run_id, str(tmp_path / "report.txt"))
    c.set_terminated(run.info.run_id)
    prefix = mlflow_server.artifacts_destination.removeprefix(f"s3://{s3.bucket}/")
    assert any(k.startswith(prefix) and k.endswith(f"{run.info.run_id}/artifacts/report.txt") for k in s3.keys(prefix))
    back = c.download_artifacts(run.info.run_id, "report.txt", str(tmp_path / "back"))
    assert Path(back).read_bytes() == b"proxied through the tracking server\n"


@pytest.mark.slow
def test_basic_auth_and_allowed_hosts(s3, tmp_path):
    """mlflow/start-server.sh with the basic-auth template: anonymous requests are refused, the admin (password
    from the environment) is let in, and a Host header outside MLFLOW_SERVER_ALLOWED_HOSTS is rejected."""
    import secrets
    import urllib.error
    import urllib.request
    from base64 import b64encode

    from conftest import REPO
    from integration import services

    password = secrets.token_urlsafe(16)
    config = tmp_path / "auth.ini"
    config.write_text((REPO / "mlflow" / "basic_auth.ini.template").read_text().replace(
        "sqlite:///mlflow-auth.db", f"sqlite:///{tmp_path / 'auth.db'}"))
    server = services.start_mlflow(f"sqlite:///{tmp_path / 'mlflow.db'}", f"s3://{s3.bucket}/auth-test", s3.server, {
        "MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_AUTH_ADMIN_PASSWORD": password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        "MLFLOW_SERVER_ALLOWED_HOSTS": "mlflow.distillery.svc:5000,127.0.0.1:*"})
    try:
        def status(user: str | None, host: str | None = None) -> int:
            req = urllib.request.Request(f"{server.url}/api/2.0/mlflow/experiments/search?max_results=1")
            if user:
                req.add_header("Authorization", "Basic " + b64encode(f"{user}:{password}".encode()).decode())
            if host:
                req.add_header("Host", host)
            try:
                return urllib.request.urlopen(req, timeout=30).status
            except urllib.error.HTTPError as e:
                return e.code

        assert status(None) == 401
        assert status("admin") == 200
        assert status("admin", host="mlflow.distillery.svc:5000") == 200
        assert status("admin", host="evil.example:5000") == 403
    finally:
        server.stop()
