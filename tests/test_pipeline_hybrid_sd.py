"""The hybrid-sd smoke DAG end to end through the KFP local runner: teacher, parallel significance scoring, pruning,
KD of the scored and the uniform UNet, tiny VAE, split evaluation in both orders, gate, register, deploy."""

from __future__ import annotations

import math

import pytest

from test_pipeline_tiny_sd import _cli, _mlflow, _runs

pytestmark = pytest.mark.slow

STEPS = {"data", "validate", "feature-net", "train-vae", "train-unet", "score-layers-0", "score-layers-1", "prune",
         "kd-scored", "kd-uniform", "tiny-vae", "evaluate", "gate", "register", "deploy-hybrid-cloud",
         "deploy-hybrid-edge"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    home = tmp_path_factory.mktemp("hybrid") / "home"
    return home, _cli(home, "run", "hybrid-sd", "--profile", "smoke", "--cache")


def test_smoke_run_scores_prunes_distills_evaluates_and_releases(smoke):
    from distillery.papers.hybrid_sd import release

    home, proc = smoke
    client = _mlflow(home)
    runs = _runs(client, "distillery/hybrid-sd")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED", proc.stdout[-3000:]
    children = {r.data.tags["task"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert set(children) == STEPS
    assert all(r.info.status == "FINISHED" for r in children.values())

    # The two scoring shards together scored every candidate layer once.
    scored = [k for s in ("score-layers-0", "score-layers-1") for k in children[s].data.metrics if k.startswith("score/")]
    assert len(scored) == len(set(scored)) == 12
    pruned = children["prune"].data.metrics
    assert pruned["pruned_params"] < pruned["teacher_params"]
    assert abs(pruned["uniform_params"] - pruned["pruned_params"]) / pruned["pruned_params"] < 0.05
    for name in ("kd-scored", "kd-uniform"):
        m = children[name].data.metrics
        assert {"loss_denoise", "loss_out_kd", "loss_feat_kd"} <= set(m), name
    assert {"loss_enc_l1", "loss_rec_l1"} <= set(children["tiny-vae"].data.metrics)

    ev = children["evaluate"].data.metrics
    for row in ("large_only", "small_only", "uniform_only", "large_small_2of5", "small_large_2of5"):
        assert math.isfinite(ev[f"{row}_fd"]), row
    assert ev["large_only_cloud_fraction"] == 1.0 and ev["small_only_cloud_fraction"] == 0.0
    assert ev["cloud_flops_ratio_large_small"] == pytest.approx(0.4)
    assert ev["small_params"] < ev["large_params"]
    top = {a.path for a in client.list_artifacts(children["evaluate"].info.run_id)}
    assert {"split_table.json", "split_table.md", "quality_vs_cloud_cost.png"} <= top
    assert len(client.list_artifacts(children["evaluate"].info.run_id, "samples")) == 5

    mv = client.get_model_version_by_alias("hybrid-sd", "champion")
    assert str(mv.version) == "1"
    releases = sorted(home.rglob("evaluate-hybrid*/release/hybrid.json"))
    assert releases and release.load_config(releases[-1].parent)["split"] == 2
