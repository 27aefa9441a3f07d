"""MLflow tracking (parent + nested runs), registry (aliases, gate, rollback), step runner, storage, compare."""

from __future__ import annotations

import hashlib
import json

import pytest


def test_step_runs_nest_under_the_parent_with_lineage_tags(home, tmp_path):
    from distillery.platform import tracking
    from distillery.platform.stepping import run_step

    parent = tracking.start_pipeline_run("demo", {"lr": 0.1, "thresholds": {"fd": ["max", 1]}})

    class KfpMetrics:
        logged = {}
        path = str(tmp_path / "metrics")

        def log_metric(self, k, v):
            self.logged[k] = v

    km = KfpMetrics()
    result = run_step(lambda x: {"score": x * 2, "note": "text", "bad": float("nan")}, pipeline="demo", step="one",
                      kfp_run_id="kfp-1", kfp_metrics=km, x=3)
    assert result["score"] == 6 and km.logged == {"score": 6.0}
    assert json.loads((tmp_path / "metrics").read_text()) == {"score": 6.0}  # a file, so KFP's cache can reuse it

    with pytest.raises(RuntimeError):
        with tracking.step_run("demo", "two", parent_run_id=parent, kfp_run_id="kfp-1"):
            raise RuntimeError("boom")

    c = tracking.client()
    runs = {r.data.tags["task"]: r for r in c.search_runs([tracking.experiment_for("demo")])
            if r.data.tags.get("distillery.role") == "step"}
    assert runs["two"].info.status == "FAILED"
    assert runs["two"].data.tags["mlflow.parentRunId"] == parent
    # Without DISTILLERY_PARENT_RUN_ID the step found-or-created a parent for its KFP run id.
    one_parent = runs["one"].data.tags["mlflow.parentRunId"]
    assert c.get_run(one_parent).data.tags["kfp_run_id"] == "kfp-1"
    assert runs["one"].data.metrics == {"score": 6.0} and runs["one"].data.params["x"] == "3"
    assert c.get_run(parent).data.params["thresholds"] == '{"fd": ["max", 1]}'


def test_registry_promote_rollback_and_download(home, tmp_path):
    from distillery.platform import registry, tracking

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights.safetensors").write_bytes(b"w1")
    parent = tracking.start_pipeline_run("demo", {})
    versions = []
    for fd in (5.0, 4.0):
        with tracking.step_run("demo", "register", parent_run_id=parent) as run:
            versions.append(registry.register_dir("demo-model", folder, run.info.run_id, metrics={"fd": fd},
                                                  tags={"parent_run_id": parent}))
        registry.promote("demo-model", versions[-1])
    assert versions == ["1", "2"]
    assert str(registry.champion("demo-model").version) == "2" and registry.champion_metrics("demo-model") == {"fd": 4.0}
    assert registry.rollback("demo-model") == "1"
    assert str(registry.champion("demo-model").version) == "1"
    with pytest.raises(ValueError, match="no previous champion"):
        registry.rollback("demo-model")
    got = registry.download("demo-model", "champion", dst=tmp_path / "dl")
    assert (got / "weights.safetensors").read_bytes() == b"w1"
    assert registry.version_for_run("demo-model", parent) == "2"  # the newest it registered
    listed = {m["name"]: m for m in registry.list_models()}
    assert listed["demo-model"]["versions"] == ["1", "2"]
    assert listed["demo-model"]["aliases"]["champion"] in (1, "1")


def test_gate_checks_thresholds_and_the_champion():
    from distillery.platform.registry import gate

    th = {"fd": ("max", 10.0), "cond_acc": ("min", 0.5)}
    dirs = {"fd": "min", "cond_acc": "max"}
    assert gate({"fd": 5.0, "cond_acc": 0.9}, th, {}, dirs) == (True, [])
    ok, reasons = gate({"fd": 12.0, "cond_acc": 0.4}, th, {}, dirs)
    assert not ok and len(reasons) == 2 and "above the maximum" in reasons[0]
    ok, reasons = gate({"fd": 6.0, "cond_acc": 0.9}, th, {"fd": 5.0}, dirs)
    assert not ok and "worse than the champion" in reasons[0]
    ok, reasons = gate({"cond_acc": 0.9}, th, {}, dirs)
    assert not ok and "fd missing" in reasons[0]


def test_local_storage_round_trip(tmp_path):
    from distillery.platform import storage

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(b"a" * 1000)
    (src / "sub" / "b.txt").write_text("b")
    storage.upload(src, str(tmp_path / "store"))
    out = storage.download(f"file://{tmp_path / 'store'}", tmp_path / "out")
    assert (out / "sub" / "b.txt").read_text() == "b"
    assert storage.sha256_file(out / "a.bin") == hashlib.sha256(b"a" * 1000).hexdigest()
    assert storage.exists(str(tmp_path / "store")) and not storage.exists(str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError):
        storage.download(str(tmp_path / "none"), tmp_path / "x")
