"""teacher-prior's one smoke DAG run of the suite, as a cluster runs it: every task in its own container of the
image, configured only by the rendered ConfigMap and Secret, against the MLflow server, RGW and Optuna on
PostgreSQL (the sweep workers share one study there)."""

from __future__ import annotations

import json

import pytest

from integration.containers import check_lineage

pytestmark = pytest.mark.slow

STEPS = {"env", "teacher", "rollouts", "validate", "sweep-0", "sweep-1", "select-best", "student-method",
         "student-no-aux", "student-no-disc", "student-dagger", "student-bc", "student-scratch", "evaluate", "gate",
         "register", "deploy"}
POLICIES = ("teacher", "method", "no_aux", "no_disc", "dagger", "bc", "scratch")


def test_teacher_prior_smoke_runs_in_containers(cluster_like, image, s3):
    """Privileged teacher, validated rollouts, two sweep workers on one study, six students from one
    initialization, evaluation on held-out terrain under noise and wider randomization, the method released."""
    run, client, _ = cluster_like
    seconds = run("teacher-prior", dict(model_name="teacher-prior-ct"))
    print(f"teacher-prior smoke in containers: {seconds:.1f} s")
    children = check_lineage(client, "teacher-prior", "teacher-prior-ct", STEPS, image, s3, own_data=True)
    assert STEPS <= set(children)
    assert any(a.path.endswith(".html") for a in client.list_artifacts(children["validate"].info.run_id))
    # Both workers ran their trial in the same study: the one that finished last counted both.
    sweeps = [children[f"sweep-{w}"].data.metrics for w in (0, 1)]
    assert max(m["trials_in_study"] for m in sweeps) == 2.0 and all(m["finished_here"] == 1.0 for m in sweeps), sweeps
    trials = client.search_runs([children["sweep-0"].info.experiment_id], "tags.`optuna.study` LIKE 'teacher-prior%'")
    assert {t.data.tags["optuna.state"] for t in trials} == {"COMPLETE"} and len(trials) == 2
    with open(client.download_artifacts(children["select-best"].info.run_id, "best_trial.json")) as f:
        best = json.load(f)["best_params"]
    method = children["student-method"].data
    assert float(method.params["w_style"]) == pytest.approx(best["w_style"])
    assert {"final_disc_accuracy", "final_aux_mse", "final_style_reward"} <= set(method.metrics)
    assert "final_aux_mse" not in children["student-no-aux"].data.metrics
    assert "final_disc_accuracy" not in children["student-no-disc"].data.metrics
    ev = children["evaluate"].data.metrics
    for name in POLICIES:
        for cond in ("noise1", "wide"):
            assert f"{name}_{cond}_return" in ev and 0 <= ev[f"{name}_{cond}_fall_rate"] <= 1
    assert ev["return"] == ev["method_noise1_return"] and ev["onnx_max_abs_diff"] <= 1e-5
    assert ev["return_ratio_vs_teacher"] == pytest.approx(ev["method_noise1_return"] / ev["teacher_noise1_return"])
    for imitation in ("dagger", "bc"):
        assert ev[f"return_ratio_vs_{imitation}"] == pytest.approx(ev["method_noise1_return"]
                                                                  / ev[f"{imitation}_noise1_return"])
    assert ev["steps_to_no_aux_80pct_ratio"] == pytest.approx(ev["method_steps_to_no_aux_80pct"]
                                                             / max(ev["no_aux_steps_to_80pct"], 1.0))
    artifacts = {a.path for a in client.list_artifacts(children["evaluate"].info.run_id)}
    assert {"learning_curves.png", "evaluation_table.md", "evaluation.json"} <= artifacts
    assert "inferenceservice.yaml" in {a.path for a in client.list_artifacts(children["deploy"].info.run_id)}
