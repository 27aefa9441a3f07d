"""The smdp-nav smoke DAG end to end through the KFP local runner, and what it leaves behind."""

from __future__ import annotations

import pytest

from test_pipeline_tiny_sd import finished_steps, smoke_run

pytestmark = pytest.mark.slow

STEPS = {"scenarios", "validate", "train-smdp", "train-naive", "train-fixed-0.1s", "train-fixed-0.3s",
         "train-fixed-0.8s", "evaluate", "gate", "register", "deploy"}
POLICIES = ("adaptive_smdp", "adaptive_naive", "fixed_0p1s", "fixed_0p3s", "fixed_0p8s")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    return smoke_run(tmp_path_factory, "smdp-nav")


def test_smoke_run_trains_five_policies_evaluates_and_registers_the_adaptive_one(smoke):
    client, _, children = finished_steps(smoke, "smdp-nav", STEPS)
    assert children["scenarios"].data.tags["data_revision"]
    assert any(a.path.endswith(".html") for a in client.list_artifacts(children["validate"].info.run_id))
    budgets = {t: children[t].data.metrics["sim_seconds"] for t in STEPS if t.startswith("train-")}
    assert all(b >= 480 for b in budgets.values()), budgets  # the same simulated-time budget for every policy
    fixed_short = children["train-fixed-0.1s"].data.metrics
    assert fixed_short["decisions"] > children["train-fixed-0.8s"].data.metrics["decisions"]

    ev = children["evaluate"].data.metrics
    for name in POLICIES:
        assert 0.0 <= ev[f"{name}_success_rate"] <= 1.0 and ev[f"{name}_decisions_per_episode"] >= 1
        assert f"{name}_crowded_success_rate" in ev and f"{name}_irsim_success_rate" in ev
    assert ev["success_rate"] == ev["adaptive_smdp_success_rate"]
    assert ev["success_vs_naive"] == pytest.approx(ev["adaptive_smdp_success_rate"] - ev["adaptive_naive_success_rate"])
    artifacts = {a.path for a in client.list_artifacts(children["evaluate"].info.run_id)}
    assert {"duration_vs_density.png", "evaluation_table.md", "evaluation.json", "trajectories"} <= artifacts
    assert "inferenceservice.yaml" in {a.path for a in client.list_artifacts(children["deploy"].info.run_id)}
    mv = client.get_model_version_by_alias("smdp-nav", "champion")
    assert str(mv.version) == "1"
