"""The hybrid-sd smoke DAG end to end through the KFP local runner: teacher, sharded layer scores, pruning, the
two knowledge-distilled small UNets, the tiny VAE, the split evaluation, the gate and the release of both halves.
Serving the released pair (cloud then edge) is tests/test_hybrid_sd_serving.py."""

from __future__ import annotations

import json

import pytest

from test_pipeline_tiny_sd import finished_steps, smoke_run

pytestmark = pytest.mark.slow

STEPS = {"data", "validate", "feature-net", "train-vae", "train-unet", "score-layers-0", "score-layers-1", "prune",
         "kd-scored", "kd-uniform", "tiny-vae", "evaluate", "gate", "register", "deploy-hybrid-cloud",
         "deploy-hybrid-edge"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    return smoke_run(tmp_path_factory, "hybrid-sd")


def test_smoke_run_prunes_distills_evaluates_splits_and_releases_both_halves(smoke):
    client, parent, children = finished_steps(smoke, "hybrid-sd", STEPS)

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
    for k in ("fd_large", "fd_small", "fd_large_small", "fd_uniform"):
        assert ev[k] >= 0, k
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
    mv = client.get_model_version_by_alias("hybrid-sd", "champion")
    assert str(mv.version) == "1" and mv.tags["parent_run_id"] == parent.info.run_id
