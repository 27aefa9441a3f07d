"""The command line: help, parameter validation, cron, compile, models commands."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from distillery.cli import app, kfp_cron

runner = CliRunner()


def test_help_lists_every_command():
    out = runner.invoke(app, ["--help"]).output
    for cmd in ("run", "compile", "submit", "schedule", "serve", "models", "compare", "data"):
        assert cmd in out


def test_bad_parameters_are_refused_before_anything_runs(home):
    r = runner.invoke(app, ["run", "tiny-sd", "--set", "resolution=30", "--set", "guidance_scale=0"])
    assert r.exit_code == 2
    assert "resolution" in r.output and "guidance_scale" in r.output
    r = runner.invoke(app, ["run", "tiny-sd", "--set", "nonsense=1"])
    assert r.exit_code == 2 and "unknown parameter" in r.output and "unet_steps" in r.output
    r = runner.invoke(app, ["run", "tiny-sd", "--profile", "huge"])
    assert r.exit_code == 2 and "smoke" in r.output
    r = runner.invoke(app, ["run", "no-such-pipeline"])
    assert r.exit_code == 2 and "tiny-sd" in r.output
    # more per class than the smallest emoji class holds: refused here, not by the data step
    r = runner.invoke(app, ["run", "hybrid-sd", "--set", "sources=mnist,emoji", "--set", "per_class=86"])
    assert r.exit_code == 2 and "at most 85" in r.output
    assert not (home / "pipeline_root").exists()


def test_per_class_is_checked_against_the_sources_unless_a_dataset_is_given():
    from pipelines import registry
    from pipelines.params import ParameterError, resolve

    func = registry()["swift-diffusion"]
    assert resolve("swift-diffusion", func, "smoke", {"sources": "emoji", "per_class": 85})["per_class"] == 85
    with pytest.raises(ParameterError, match="per_class 86 .* at most 85"):
        resolve("swift-diffusion", func, "smoke", {"sources": "emoji", "per_class": 86})
    assert resolve("swift-diffusion", func, "smoke", {"sources": "emoji", "per_class": 86,
                                                      "dataset_uri": "s3://bucket/data"})["per_class"] == 86


def test_cron_expressions():
    assert kfp_cron("0 3 * * *") == "0 0 3 * * *"
    assert kfp_cron("0 */5 * * * *") == "0 */5 * * * *"
    for bad in ("every day", "* * *", "0 3 * * * * *", "0 3 ** * *"):
        try:
            kfp_cron(bad)
        except ValueError as e:
            assert "cron" in str(e)
        else:
            raise AssertionError(bad)
    r = runner.invoke(app, ["schedule", "tiny-sd", "--cron", "daily", "--host", "http://127.0.0.1:1"])
    assert r.exit_code == 2 and "invalid cron" in r.output


def test_submit_without_an_endpoint_says_how_to_set_one(home):
    r = runner.invoke(app, ["submit", "tiny-sd"])
    assert r.exit_code != 0
    assert "DISTILLERY_KFP_HOST" in str(r.exception) + r.output


def _tasks(spec: dict) -> set[str]:
    """Every task name in the IR: the steps sit in the exit handler's sub-DAG, not at the root."""
    dags = [spec["root"]["dag"]] + [c["dag"] for c in spec["components"].values() if "dag" in c]
    return {name for dag in dags for name in dag["tasks"]}


def test_compile_writes_ir_with_parameter_descriptions_and_profile_defaults(home, tmp_path):
    r = runner.invoke(app, ["compile", "tiny-sd", "--profile", "cpu", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    spec = next(yaml.safe_load_all((tmp_path / "tiny-sd.yaml").read_text()))  # then the kubernetes platform spec
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert "Frechet" in params["gate_thresholds"]["description"] or "fd" in params["gate_thresholds"]["description"]
    assert params["unet_steps"]["defaultValue"] == 8000  # the cpu profile
    assert "description" in params["cond_dropout"]
    assert set(spec["root"]["dag"]["tasks"]) == {"exit-handler-1", "finish-run"}  # finish-run ends the MLflow run
    assert {"prepare-image-captions", "validate-image-captions", "train-vae", "train-unet", "gate"} <= _tasks(spec)


def test_models_commands_explain_missing_models(home):
    r = runner.invoke(app, ["models", "rollback", "nothing-here"])
    assert r.exit_code == 2 and "error" in r.output
    r = runner.invoke(app, ["models", "list"])
    assert r.exit_code == 0


def test_scott_compiles_with_both_teacher_branches_and_validates_its_sweep(home, tmp_path):
    r = runner.invoke(app, ["compile", "--out", str(tmp_path)])  # default profile: cpu
    assert r.exit_code == 0, r.output
    assert {p.name for p in tmp_path.glob("*.yaml")} >= {"tiny-sd.yaml", "scott.yaml"}
    text = (tmp_path / "scott.yaml").read_text()
    spec = next(yaml.safe_load_all(text))
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert "importer" in text and "parameterIterator" in text  # dsl.importer branch and the sweep's ParallelFor
    assert params["trials_per_worker"]["defaultValue"] == 4 and "Optuna" in params["trials_per_worker"]["description"]
    assert params["trial_rungs"]["defaultValue"] == 3 and params["discriminator"]["defaultValue"] == "teacher"
    assert _tasks(spec) >= {"prepare-image-captions", "train-feature-net", "condition-branches-2", "finish-run"}
    r = runner.invoke(app, ["run", "scott", "--set", "sweep_workers=[]", "--set", "solver_substeps=0",
                            "--set", "discriminator=clip"])
    assert r.exit_code == 2 and all(k in r.output for k in ("sweep_workers", "solver_substeps", "discriminator"))
    r = runner.invoke(app, ["run", "scott", "--set", "teacher_eval_steps=[4, 50]"])
    assert r.exit_code == 2 and "teacher_eval_steps must include 25" in r.output
    assert not (home / "pipeline_root").exists()
