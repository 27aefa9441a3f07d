"""Pipelines as a cluster runs them: the compiled YAML, every task in its own container of the built image as
uid 1000 (kfp.local.DockerRunner through podman's Docker API), configured only by the kustomize-rendered
ConfigMap and Secret, against the MLflow server (PostgreSQL + Ceph RGW artifacts) and Optuna on PostgreSQL.
The containers share nothing on disk but the KFP pipeline root."""

from __future__ import annotations

import json

import pytest

from integration.containers import check_lineage

pytestmark = pytest.mark.slow


def test_tiny_sd_smoke_runs_in_containers(cluster_like, image, s3):
    run, client, env = cluster_like
    assert not any(k.startswith("DISTILLERY_PARENT") for k in env)  # a pod knows only its KFP run
    overrides = dict(model_name="tiny-sd-ct", per_class=12, feature_steps=5, vae_steps=5, unet_steps=5,
                     eval_per_class=2, eval_steps=2)
    seconds = run("tiny-sd", overrides)
    print(f"tiny-sd smoke in containers: {seconds:.1f} s")
    check_lineage(client, "tiny-sd", "tiny-sd-ct", {"data", "validate", "feature-net", "train-vae", "train-unet",
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
    children = check_lineage(client, "hybrid-sd", "hybrid-sd-ct", HYBRID_STEPS, image, s3)
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
    # the VAE-swapped rows: the large model through the tiny VAE, each small UNet through the teacher's VAE
    assert {"large_only_tiny_vae", "small_only_sd_vae", "uniform_only_sd_vae"} <= set(rows)
    assert rows["large_only_tiny_vae"]["cloud_flops"] == rows["large_only"]["cloud_flops"]
    assert rows["large_only_tiny_vae"]["fd"] != rows["large_only"]["fd"]  # the same latents, another decoder
    assert ev["fd_ratio_scored_vs_uniform_sd_vae"] == pytest.approx(
        rows["small_only_sd_vae"]["fd"] / rows["uniform_only_sd_vae"]["fd"])
    assert ev["fd_ratio_tiny_vae_on_large"] == pytest.approx(
        rows["large_only_tiny_vae"]["fd"] / rows["large_only"]["fd"])
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
    children = check_lineage(client, "smdp-nav", "smdp-nav-ct", SMDP_STEPS, image, s3, own_data=True)
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
