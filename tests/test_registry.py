"""Model registry: a diffusers model folder registered, promoted, downloaded and loaded with from_pretrained;
aliases, rollback, the gate, clear errors; and the same registry with its artifacts on S3 (moto)."""

from __future__ import annotations

import pytest


def _folder(path, content: bytes):
    path.mkdir(parents=True, exist_ok=True)
    (path / "weights.safetensors").write_bytes(content)
    (path / "config.json").write_text("{}")
    return path


def _register(name, folder, metrics=None, tags=None):
    from distillery.platform import registry, tracking

    with tracking.step_run("demo", "register") as run:
        return registry.register_dir(name, folder, run.info.run_id, metrics=metrics, tags=tags)


def test_diffusers_folder_round_trip(home, tmp_path):
    import mlflow
    import torch
    from diffusers import AutoencoderKL

    from distillery.platform import registry, tracking

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=2, norm_num_groups=4,
                        layers_per_block=1, sample_size=8)
    vae.save_pretrained(tmp_path / "vae")
    version = _register("tiny-vae", tmp_path / "vae", metrics={"fd": 3.5, "bad": float("nan")})
    assert version == "1"
    registry.promote("tiny-vae", version)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        want = vae.encode(x).latent_dist.mean

    for got_dir in (registry.download("tiny-vae", dst=tmp_path / "dl"),
                    registry.download("tiny-vae", "1"),
                    # plain MLflow resolves the alias to the same folder, without our code
                    mlflow.artifacts.download_artifacts("models:/tiny-vae@champion", dst_path=str(tmp_path / "m"))):
        loaded = AutoencoderKL.from_pretrained(got_dir)
        with torch.no_grad():
            assert torch.equal(loaded.encode(x).latent_dist.mean, want)
    assert registry.champion_metrics("tiny-vae") == {"fd": 3.5}  # non-finite metrics are not recorded
    assert registry.storage_uri("tiny-vae", "1").endswith("/artifacts/model")
    run_id = registry.champion("tiny-vae").run_id
    assert {a.path for a in tracking.client().list_artifacts(run_id, "model")} >= {
        "model/config.json", "model/diffusion_pytorch_model.safetensors"}


def test_aliases_promotion_and_rollback(home, tmp_path):
    from distillery.platform import registry, tracking

    assert registry.champion("m") is None and registry.champion_metrics("m") == {}
    parent = tracking.start_pipeline_run("demo", {})
    versions = [_register("m", _folder(tmp_path / f"v{i}", bytes([i])), metrics={"fd": 10.0 - i},
                          tags={"parent_run_id": parent}) for i in (1, 2, 3)]
    assert versions == ["1", "2", "3"]
    models = {m["name"]: m for m in registry.list_models()}
    assert models["m"]["aliases"] == {"challenger": "3"} and models["m"]["versions"] == ["1", "2", "3"]

    for v in versions:
        registry.promote("m", v)
    registry.promote("m", "3")  # promoting the champion again changes nothing
    m = {m["name"]: m for m in registry.list_models()}["m"]
    assert m["aliases"] == {"champion": "3"}  # the challenger won, so it no longer is one
    assert m["champion_metrics"] == {"fd": 7.0}
    assert registry.version_for_run("m", parent) == "3"
    assert registry.version_for_run("m", "some-other-run") is None

    assert registry.rollback("m") == "2" and registry.champion("m").version in (2, "2")
    assert registry.rollback("m") == "1"
    assert (registry.download("m", "champion", dst=tmp_path / "c") / "weights.safetensors").read_bytes() == bytes([1])
    # The stable copy follows promotions and rollbacks.
    assert registry.champion_uri("m") == str(home.resolve() / "champions" / "m")
    assert (home / "champions" / "m" / "weights.safetensors").read_bytes() == bytes([1])
    with pytest.raises(ValueError, match="no previous champion"):
        registry.rollback("m")

    with pytest.raises(registry.RegistryError, match="no version '9'"):
        registry.promote("m", "9")
    with pytest.raises(registry.RegistryError, match="no registered model named 'nope'"):
        registry.rollback("nope")
    with pytest.raises(registry.RegistryError, match="cannot resolve models:/m@staging"):
        registry.download("m", "staging", dst=tmp_path / "x")


def test_register_refuses_empty_folders_and_pickles(home, tmp_path):
    from distillery.platform import registry

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="non-empty model folder"):
        _register("m", tmp_path / "empty")
    with pytest.raises(ValueError, match="non-empty model folder"):
        _register("m", tmp_path / "missing")
    folder = _folder(tmp_path / "p", b"w")
    (folder / "model.pkl").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="refusing to register pickled files"):
        _register("m", folder)
    assert registry.list_models() == []


def test_gate_checks_thresholds_and_the_champion():
    from distillery.platform.registry import gate

    th = {"fd": ("max", 10.0), "cond_acc": ("min", 0.5)}
    dirs = {"fd": "min", "cond_acc": "max"}
    assert gate({"fd": 5.0, "cond_acc": 0.9}, th, {}, dirs) == (True, [])
    assert gate({"fd": 5.0, "cond_acc": 0.9}, th, {"fd": 5.0}, dirs) == (True, [])  # equal to the champion passes
    ok, reasons = gate({"fd": 12.0, "cond_acc": 0.4}, th, {}, dirs)
    assert not ok and reasons == ["fd=12 is above the maximum 10", "cond_acc=0.4 is below the minimum 0.5"]
    ok, reasons = gate({"fd": 6.0, "cond_acc": 0.9}, th, {"fd": 5.0, "cond_acc": 0.1}, dirs)
    assert not ok and reasons == ["fd=6 is worse than the champion's 5 (lower is better)"]
    ok, reasons = gate({"fd": float("nan"), "cond_acc": 0.9}, th, {}, dirs)
    assert not ok and reasons[0].startswith("fd missing or not a finite number")
    # the primary metric may be one to maximize
    ok, reasons = gate({"acc": 0.5}, {}, {"acc": 0.6}, {"acc": "max"})
    assert not ok and "higher is better" in reasons[0]
    assert gate({}, {}, {"acc": 0.6}, {"acc": "max"})[0] is False  # cannot compare: fails
    with pytest.raises(ValueError, match="must be \\('max' or 'min', number\\)"):
        gate({"fd": 1.0}, {"fd": ("below", 2.0)}, {}, dirs)
    with pytest.raises(ValueError, match="directions must be"):
        gate({"fd": 1.0}, {}, {}, {"fd": "lower"})


def test_registry_with_artifacts_on_s3(home, tmp_path, monkeypatch):
    moto = pytest.importorskip("moto")
    import boto3

    from distillery.platform import registry
    from distillery.settings import get_settings

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MLFLOW_S3_ENDPOINT_URL", raising=False)  # moto serves the default AWS endpoint
    monkeypatch.setenv("DISTILLERY_ARTIFACT_LOCATION", "s3://mlflow-bkt/artifacts")
    get_settings.cache_clear()
    with moto.mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="mlflow-bkt")
        version = _register("s3-model", _folder(tmp_path / "v", b"on s3"), metrics={"fd": 1.0})
        registry.promote("s3-model", version)
        uri = registry.storage_uri("s3-model", version)
        assert uri.startswith("s3://mlflow-bkt/artifacts/demo/") and uri.endswith("/artifacts/model")
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket="mlflow-bkt")["Contents"]}
        assert any(k.endswith("/artifacts/model/weights.safetensors") for k in keys)
        got = registry.download("s3-model", dst=tmp_path / "dl")
        assert (got / "weights.safetensors").read_bytes() == b"on s3"
        assert registry.champion_uri("s3-model") == "s3://mlflow-bkt/champions/s3-model"
        copy = s3.get_object(Bucket="mlflow-bkt", Key="champions/s3-model/weights.safetensors")["Body"].read()
        assert copy == b"on s3"


ENDPOINT_SCRIPT = """
import boto3, moto, pathlib, sys
from urllib.parse import urlparse
hosts = set()
with moto.mock_aws():
    boto3.setup_default_session()  # every client made by boto3.client (ours and MLflow's) reports its requests
    boto3.DEFAULT_SESSION.events.register("before-send.s3", lambda request, **kw: hosts.add(urlparse(request.url).netloc))
    from distillery.platform import registry, storage, tracking
    storage._s3().create_bucket(Bucket="bkt")  # through the configured endpoint
    folder = pathlib.Path(sys.argv[1]) / "m"
    folder.mkdir()
    (folder / "weights.safetensors").write_bytes(b"via endpoint")
    with tracking.step_run("demo", "register") as run:
        version = registry.register_dir("ep-model", folder, run.info.run_id)
    src = registry.storage_uri("ep-model", version)
    assert src.startswith("s3://bkt/mlflow/demo/"), src
    assert storage.exists(src + "/weights.safetensors")  # MLflow wrote where our storage module reads
    got = storage.download(src, pathlib.Path(sys.argv[1]) / "via-storage")
    assert (got / "weights.safetensors").read_bytes() == b"via endpoint"
    got = registry.download("ep-model", version, dst=pathlib.Path(sys.argv[1]) / "via-mlflow")
    assert (got / "weights.safetensors").read_bytes() == b"via endpoint"
    assert hosts == {"127.0.0.1:7480"}, hosts
    print("ok")
"""


def test_s3_endpoint_from_settings_is_used_by_mlflow_and_storage(home, tmp_path):
    """Settings alone switch both MLflow's artifacts and our storage to an S3 endpoint (moto answers for it)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("moto")
    from conftest import REPO

    endpoint = "http://127.0.0.1:7480"
    env = {**os.environ, "DISTILLERY_S3_ENDPOINT_URL": endpoint, "MOTO_S3_CUSTOM_ENDPOINTS": endpoint,
           "DISTILLERY_ARTIFACT_LOCATION": "s3://bkt/mlflow", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    env.pop("MLFLOW_S3_ENDPOINT_URL", None)
    out = subprocess.run([sys.executable, "-c", ENDPOINT_SCRIPT, str(tmp_path)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
