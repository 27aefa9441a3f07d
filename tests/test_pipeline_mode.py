"""The mode smoke DAG end to end through the KFP local runner, and what it leaves behind."""

from __future__ import annotations

import math

import pytest

from test_pipeline_tiny_sd import _cli, _mlflow, _runs

pytestmark = pytest.mark.slow

STEPS = {"demos", "validate", "train-mode", "train-dense", "evaluate", "gate", "register", "deploy"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    home = tmp_path_factory.mktemp("mode") / "home"
    return home, _cli(home, "run", "mode", "--profile", "smoke")


def test_smoke_run_trains_evaluates_and_registers_the_cached_policy(smoke):
    home, proc = smoke
    assert "distillery serve mode" in proc.stdout, proc.stdout[-3000:]
    client = _mlflow(home)
    runs = _runs(client, "distillery/mode")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = {r.data.tags["task"]: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert set(children) == STEPS
    assert children["demos"].data.tags["data_revision"].endswith(".dir")  # DVC's md5 of the demos artifact
    assert any(a.path.endswith(".html") for a in client.list_artifacts(children["validate"].info.run_id))

    mode, dense = children["train-mode"].data.metrics, children["train-dense"].data.metrics
    assert mode["mode_total_parameters"] > mode["mode_active_parameters"]
    assert math.isfinite(mode["mode_balance_loss"]) and dense["dense_balance_loss"] == 0.0

    ev = children["evaluate"].data.metrics
    for name in ("mode_cached", "mode", "dense"):
        assert 0.0 <= ev[f"{name}_seen_success_rate"] <= 1.0
        assert ev[f"{name}_latency_s"] > 0 and ev[f"{name}_flops_per_chunk"] > 0
        assert {f"{name}_success_{t}" for t in ("reach_v3", "window_close_v3")} <= set(ev)
    assert ev["cached_matches_uncached"] == 1.0
    assert ev["mode_cached_seen_success_rate"] == ev["mode_seen_success_rate"]  # same actions, same episodes
    # The gate looks at the served policy on variations the demonstrations did not cover.
    assert ev["success_rate"] == ev["mode_cached_unseen_success_rate"] and "dense_unseen_success_rate" in ev
    assert ev["served_speedup"] == pytest.approx(ev["cache_speedup"] * ev["frozen_speedup"])
    artifacts = {a.path for a in client.list_artifacts(children["evaluate"].info.run_id)}
    assert {"evaluation_table.json", "evaluation_table.md", "trajectories"} <= artifacts
    assert len(client.list_artifacts(children["evaluate"].info.run_id, "trajectories")) == 3
    frames = {a.path for a in client.list_artifacts(children["evaluate"].info.run_id, "frames")}
    assert frames == {f"frames/{n}.png" for n in ("mode-cached", "mode", "dense")}, frames  # rendered headless (EGL)
    deploy = {a.path for a in client.list_artifacts(children["deploy"].info.run_id)}
    assert "inferenceservice.yaml" in deploy

    mv = client.get_model_version_by_alias("mode", "champion")
    assert str(mv.version) == "1"
