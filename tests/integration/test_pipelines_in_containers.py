"""Pipelines as a cluster runs them: the compiled YAML, every task in its own container of the built image as
uid 1000 (kfp.local.DockerRunner through podman's Docker API), configured only by the kustomize-rendered
ConfigMap and Secret, against the MLflow server (PostgreSQL + Ceph RGW artifacts) and Optuna on PostgreSQL.
The containers share nothing on disk but the KFP pipeline root."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from integration.containers import REPO, podman_env

pytestmark = pytest.mark.slow

KUBECTL = str(Path(sys.executable).parent / "kubectl")


@pytest.fixture(scope="module")
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


def _pod_env(tmp_path: Path, config: dict[str, str], secret: dict[str, str]) -> dict[str, str]:
    """The env a pod gets: an overlay of manifests/base (the test servers' addresses patched into the ConfigMap,
    the credentials Secret generated), rendered with kustomize, its ConfigMap and Secret data turned into env the
    way the compiled tasks map them (key -> env var of the same name)."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    base = os.path.relpath(REPO / "manifests" / "base", overlay)
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": [base],
        "patches": [{"target": {"kind": "ConfigMap", "name": "distillery-config"},
                     "patch": yaml.safe_dump([{"op": "add", "path": f"/data/{k}", "value": v}
                                              for k, v in config.items()])}],
        "secretGenerator": [{"name": "distillery-credentials", "literals": [f"{k}={v}" for k, v in secret.items()]}],
        "generatorOptions": {"disableNameSuffixHash": True}}))
    out = subprocess.run([KUBECTL, "kustomize", str(overlay)], capture_output=True, text=True, check=True).stdout
    docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out) if d}
    env = dict(docs[("ConfigMap", "distillery-config")]["data"])
    env.update({k: base64.b64decode(v).decode() for k, v in docs[("Secret", "distillery-credentials")]["data"].items()})
    return env


@pytest.fixture
def cluster_like(tmp_path, image, docker_api, postgres_server, s3, mlflow_server, monkeypatch):
    """(run(pipeline, overrides) -> seconds, the MLflow client of the server, the pod env)."""
    from kfp import local

    root = tmp_path / "pipeline_root"
    root.mkdir()
    root.chmod(0o777)  # the one shared folder; the containers write it as uid 1000
    optuna = postgres_server.create_database(f"optuna_ct_{os.getpid()}_{time.time_ns() % 10**6}",
                                             driver="postgresql")  # no driver named: the pods must cope
    env = _pod_env(tmp_path,
                   {"DISTILLERY_TRACKING_URI": mlflow_server.url,
                    "DISTILLERY_ARTIFACT_LOCATION": f"s3://{s3.bucket}/artifacts",
                    "DISTILLERY_S3_ENDPOINT_URL": s3.endpoint_url, "MLFLOW_S3_ENDPOINT_URL": s3.endpoint_url,
                    "DISTILLERY_PIPELINE_ROOT": str(root), "DISTILLERY_HOME": "/tmp/distillery",
                    "DISTILLERY_DEPLOY_MODE": "render"},
                   {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key,
                    "DISTILLERY_OPTUNA_STORAGE": optuna})
    monkeypatch.setenv("DOCKER_HOST", docker_api)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.setenv(key, env[key])  # the client reads run artifacts straight from RGW, as a user would

    def run(pipeline: str, overrides: dict) -> float:
        compiled = tmp_path / "compiled"
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

    return run, mlflow.MlflowClient(tracking_uri=mlflow_server.url), env


def _check_lineage(client, pipeline: str, model_name: str, steps: set[str], image, s3,
                   own_data: bool = False) -> dict:
    """The checks every containerized run gets; returns its step runs by task. own_data: the pipeline versions data it generates (smdp-nav's scenarios), not the DVC-tracked sources: every
    run then carries that one revision instead of data.dvc's."""
    from distillery.platform import tracking, versioning

    exp = client.get_experiment_by_name(f"distillery/{pipeline}")
    # This run's parent: other tests share the server, but only the containers ran with this image.
    parents = client.search_runs([exp.experiment_id], f"tags.`{tracking.ROLE}` = 'pipeline' and tags.image = '{image.ref}'")
    assert len(parents) == 1, [p.info.run_id for p in parents]
    parent = parents[0]
    # The exit handler ended it with the pipeline's state: nothing else in a pod knows the pipeline is over.
    assert parent.info.status == "FINISHED" and parent.data.tags["kfp_final_state"] == "SUCCEEDED", parent.data.tags
    children = client.search_runs([exp.experiment_id], f"tags.`{tracking.PARENT_TAG}` = '{parent.info.run_id}'",
                                  max_results=500)
    assert steps <= {c.data.tags["task"] for c in children}, sorted(c.data.tags["task"] for c in children)
    assert all(c.info.status == "FINISHED" for c in children), [(c.data.tags["task"], c.info.status) for c in children]
    recorded = parent.data.tags.get("data_revision") if own_data else versioning.recorded_md5(REPO / "data.dvc")
    assert recorded, parent.data.tags
    for run in [parent, *children]:
        assert run.data.tags.get("data_revision") == recorded, (run.data.tags.get("task"), run.data.tags)
        # The commit comes from the image (DISTILLERY_GIT_COMMIT): there is no git checkout in a container.
        assert run.data.tags.get("git_commit") not in (None, "", "unknown"), run.data.tags
        assert run.data.tags.get("image") == image.ref and run.data.tags.get("image_digest") == f"sha256:{image.id}"
    mv = client.get_model_version_by_alias(model_name, "champion")
    assert mv.run_id == parent.info.run_id or client.get_run(mv.run_id).data.tags.get(tracking.PARENT_TAG) == \
        parent.info.run_id
    weights = [k for k in s3.keys("artifacts/") if mv.run_id in k and k.endswith(".safetensors")]
    assert weights, "no model weights of the champion's run in RGW"
    return {c.data.tags["task"]: c for c in children}


def test_tiny_sd_smoke_runs_in_containers(cluster_like, image, s3):
    run, client, env = cluster_like
    assert not any(k.startswith("DISTILLERY_PARENT") for k in env)  # a pod knows only its KFP run
    overrides = dict(model_name="tiny-sd-ct", per_class=12, feature_steps=5, vae_steps=5, unet_steps=5,
                     eval_per_class=2, eval_steps=2)
    seconds = run("tiny-sd", overrides)
    print(f"tiny-sd smoke in containers: {seconds:.1f} s")
    _check_lineage(client, "tiny-sd", "tiny-sd-ct", {"data", "validate", "feature-net", "train-vae", "train-unet",
                                                     "evaluate", "gate", "register", "deploy"}, image, s3)


HYBRID_STEPS = {"data", "validate", "feature-net", "train-vae", "train-unet", "score-layers-0", "score-layers-1",
                "prune", "kd-scored", "kd-uniform", "tiny-vae", "evaluate", "gate", "register", "deploy-hybrid-cloud",
                "deploy-hybrid-edge"}


def test_hybrid_sd_smoke_runs_in_containers(cluster_like, image, s3):
    """hybrid-sd's one smoke DAG run of the suite: teacher, sharded layer scores, pruning, the two distilled small
    UNets, the tiny VAE, the split evaluation, the gate and the release of both halves."""
    run, client, _ = cluster_like
    seconds = run("hybrid-sd", dict(model_name="hybrid-sd-ct"))
    print(f"hybrid-sd smoke in containers: {seconds:.1f} s")
    children = _check_lineage(client, "hybrid-sd", "hybrid-sd-ct", HYBRID_STEPS, image, s3)
    assert set(children) == HYBRID_STEPS

    # The layer scores come from two shards that split the layers between them, and pruning keeps fewer parameters.
    scored = [{k for k in children[f"score-layers-{i}"].data.metrics if k.startswith("score/")} for i in (0, 1)]
    assert scored[0] and scored[1] and not scored[0] & scored[1]
    prune = children["prune"].data.metrics
    assert prune["pruned_params"] < prune["teacher_params"] and 0 < prune["params_ratio"] < 1
    assert prune["pruned_flops"] < prune["teacher_flops"]
    assert "pruning_plan.json" in {a.path for a in client.list_artifacts(children["prune"].info.run_id)}

    ev = children["evaluate"].data.metrics
    # Splits [0, 2, 5] with the headline at 2 of 5 steps: the large UNet runs 2 of 5 steps in the cloud.
    assert ev["cloud_flops_ratio_large_small"] == pytest.approx(0.4)
    assert ev["large_only_cloud_fraction"] == 1.0 and ev["small_only_cloud_fraction"] == 0.0
    artifacts = {a.path for a in client.list_artifacts(children["evaluate"].info.run_id)}
    assert {"quality_vs_cloud_cost.png", "split_table.md", "split_table.json", "samples"} <= artifacts
    with open(client.download_artifacts(children["evaluate"].info.run_id, "split_table.json")) as f:
        table = json.load(f)
    rows = {r[0]: dict(zip(table["columns"], r)) for r in table["data"]}
    assert {"large_only", "small_only", "large_small_2of5", "small_large_2of5", "uniform_only"} <= set(rows)
    for name, row in rows.items():
        assert row["fd_ci_low"] <= row["fd"] <= row["fd_ci_high"], name  # every FD with its bootstrap interval
    assert rows["large_small_2of5"]["cloud_flops"] == pytest.approx(0.4 * rows["large_only"]["cloud_flops"])
    for half in ("cloud", "edge"):
        deploy = children[f"deploy-hybrid-{half}"]
        assert "inferenceservice.yaml" in {a.path for a in client.list_artifacts(deploy.info.run_id)}


SMDP_STEPS = {"scenarios", "validate", "train-smdp", "train-naive", "train-fixed-0.1s", "train-fixed-0.3s",
              "train-fixed-0.8s", "evaluate", "gate", "register", "deploy"}
SMDP_POLICIES = ("adaptive_smdp", "adaptive_naive", "fixed_0p1s", "fixed_0p3s", "fixed_0p8s")


def test_smdp_nav_smoke_runs_in_containers(cluster_like, image, s3):
    """smdp-nav's one smoke DAG run of the suite: five policies trained in parallel on the same simulated-time
    budget, evaluated in the training world and in ir-sim, the adaptive one released."""
    run, client, _ = cluster_like
    seconds = run("smdp-nav", dict(model_name="smdp-nav-ct"))
    print(f"smdp-nav smoke in containers: {seconds:.1f} s")
    children = _check_lineage(client, "smdp-nav", "smdp-nav-ct", SMDP_STEPS, image, s3, own_data=True)
    assert set(children) == SMDP_STEPS
    assert any(a.path.endswith(".html") for a in client.list_artifacts(children["validate"].info.run_id))
    budgets = {t: children[t].data.metrics["sim_seconds"] for t in SMDP_STEPS if t.startswith("train-")}
    assert all(b >= 480 for b in budgets.values()), budgets  # the same simulated-time budget for every policy
    assert children["train-fixed-0.1s"].data.metrics["decisions"] > \
        children["train-fixed-0.8s"].data.metrics["decisions"]
    ev = children["evaluate"].data.metrics
    for name in SMDP_POLICIES:
        assert 0.0 <= ev[f"{name}_success_rate"] <= 1.0 and ev[f"{name}_decisions_per_episode"] >= 1
        assert f"{name}_crowded_success_rate" in ev and f"{name}_irsim_success_rate" in ev
    assert ev["success_rate"] == ev["adaptive_smdp_success_rate"]
    assert ev["success_vs_naive"] == pytest.approx(ev["adaptive_smdp_success_rate"] - ev["adaptive_naive_success_rate"])
    artifacts = {a.path for a in client.list_artifacts(children["evaluate"].info.run_id)}
    assert {"duration_vs_density.png", "evaluation_table.md", "evaluation.json", "trajectories"} <= artifacts
    assert "inferenceservice.yaml" in {a.path for a in client.list_artifacts(children["deploy"].info.run_id)}
