"""MT10 demonstrations: collection with the scripted experts, the artifact format, the GX suite."""

from __future__ import annotations

import json

import numpy as np
import pytest

from distillery.data import demos as dm
from distillery.sim import mt10


@pytest.fixture(scope="module")
def demos_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demos")
    dm.collect_mt10_demos(out, episodes_per_task=1, seed=0, progress=False)
    return out


def test_every_task_has_successful_expert_episodes_with_instructions(demos_dir):
    d = dm.load_demos(demos_dir)
    assert d.tasks == list(mt10.TASKS) and len(d.instructions) == 10 and all(d.instructions)
    assert sorted(d.task.tolist()) == list(range(10)) and d.success.all()
    assert d.obs.shape == (int(d.length.sum()), 39) and d.actions.shape == (int(d.length.sum()), 4)
    assert np.abs(d.actions).max() <= 1.0
    manifest = json.loads((demos_dir / "manifest.json").read_text())
    assert manifest["episodes_per_task"] == {t: 1 for t in mt10.TASKS} and len(manifest["content_sha256"]) == 64
    # Replaying the recorded actions from the same start reproduces a successful episode.
    env = mt10.make_env(d.tasks[int(d.task[0])], variation=0)
    env.reset(seed=0)
    _, actions = d.episode(0)
    success = False
    for a in actions:
        *_, info = env.step(a)
        success = success or bool(info.get("success"))
    assert success


def test_valid_demos_pass_the_suite(demos_dir, tmp_path):
    result = dm.validate_demos(demos_dir, tmp_path / "report.html")
    assert result.success, [r.describe() for r in result.failed]
    assert "Data validation" in (tmp_path / "report.html").read_text()


def test_a_corrupted_demo_file_is_rejected_naming_the_failed_expectations(demos_dir, tmp_path):
    d = dm.load_demos(demos_dir)
    obs, act = d.obs.copy(), d.actions.copy()
    obs[3, 5] = np.nan
    act[7, 1] = 4.0
    keep = d.task != 9  # window-close-v3 goes missing
    starts = d.start[keep]
    arrays = dict(obs=obs, actions=act, episode_start=starts, episode_length=d.length[keep],
                  episode_task=d.task[keep], episode_success=np.where(np.arange(keep.sum()) == 2, False, True))
    dm.write_demos(tmp_path / "bad", arrays, d.tasks)
    result = dm.validate_demos(tmp_path / "bad", tmp_path / "bad.html")
    assert not result.success
    failed = "\n".join(r.describe() for r in result.failed)
    for words in ("has_nan", "act_max", "success", "episodes"):
        assert words in failed, failed
    from distillery.platform.validation import DataValidationError

    assert "expectations of suite 'mt10_demos' failed" in str(DataValidationError(result))


def test_unknown_task_and_bad_counts_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown task"):
        dm.collect_mt10_demos(tmp_path, episodes_per_task=1, tasks=("fly-v3",), progress=False)
    with pytest.raises(ValueError, match="episodes_per_task"):
        dm.collect_mt10_demos(tmp_path, episodes_per_task=0, progress=False)
    with pytest.raises(FileNotFoundError, match="not a demonstration dataset"):
        dm.load_demos(tmp_path)


def test_collect_step_takes_given_demos_and_records_their_dvc_md5(demos_dir, home, tmp_path):
    from mlflow import MlflowClient

    from distillery.platform import tracking, versioning
    from distillery.platform.stepping import run_step
    from distillery.steps import mode as steps

    result = run_step(steps.collect_demos, pipeline="mode", step="demos", out_dir=str(tmp_path / "copy"),
                      episodes_per_task=99, seed=5, demos_uri=str(demos_dir))
    assert result["episodes"] == 10  # the given demonstrations, not 99 fresh ones per task
    tracking.configure()
    client = MlflowClient()
    run = client.search_runs([client.get_experiment_by_name("distillery/mode").experiment_id])[0]
    assert run.data.tags["data_revision"] == versioning.content_hash(demos_dir)
    assert run.data.tags["data_revision"].endswith(".dir")  # DVC's folder md5, as dvc.lock records it
    with pytest.raises(FileNotFoundError, match="not a demonstration dataset"):
        run_step(steps.collect_demos, pipeline="mode", step="demos", out_dir=str(tmp_path / "bad"),
                 episodes_per_task=1, seed=0, demos_uri=str(tmp_path / "copy" / "manifest.json"))


def test_data_demos_command_writes_validated_demos_and_never_clobbers(tmp_path):
    from typer.testing import CliRunner

    from distillery.cli import app
    from distillery.platform import versioning

    runner, out = CliRunner(), tmp_path / "demos" / "mt10"
    r = runner.invoke(app, ["data", "demos", "--out", str(out), "--episodes-per-task", "1"])
    assert r.exit_code == 0, r.output
    assert dm.load_demos(out).manifest["episodes"] == 10
    assert versioning.content_hash(out) in r.output.replace("\n", "")
    before = versioning.content_hash(out)
    r = runner.invoke(app, ["data", "demos", "--out", str(out), "--episodes-per-task", "2"])
    assert r.exit_code == 2 and "--force" in r.output
    assert versioning.content_hash(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["mt10"]  # no temporary folder left behind


def test_dvc_stage_of_the_demos_is_locked_to_the_current_code():
    """dvc.lock must hold the md5 of demos/mt10 and of the code that produced it: changing the simulator or the
    collection code without `dvc repro mt10-demos` fails here."""
    from pathlib import Path

    import yaml

    from distillery.platform import versioning

    root = Path(__file__).resolve().parents[1]
    stage = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]["mt10-demos"]
    assert stage["outs"] == ["demos/mt10"] and "distillery data demos" in stage["cmd"]
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["mt10-demos"]
    assert lock["cmd"] == stage["cmd"]
    for dep in lock["deps"]:
        assert versioning.content_hash(root / dep["path"]) == dep["md5"], f"{dep['path']} changed: dvc repro mt10-demos"
    assert lock["outs"][0]["path"] == "demos/mt10" and lock["outs"][0]["md5"].endswith(".dir")


def test_another_benchmark_seed_gives_unseen_task_variations():
    seen, unseen = mt10.make_env("push-v3", 0), mt10.make_env("push-v3", 0, benchmark_seed=7)
    try:
        a, b = seen.reset(seed=0)[0], unseen.reset(seed=0)[0]
    finally:
        seen.close()
        unseen.close()
    assert not np.allclose(a[4:7], b[4:7])  # the puck starts elsewhere
    assert np.allclose(a, mt10.make_env("push-v3", 0).reset(seed=0)[0])  # the same variation is the same start
