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
