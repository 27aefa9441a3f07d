"""DVC data revision: the md5 recorded in data.dvc, DVC's own folder hash, a modified copy, pull from a remote."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from distillery.platform import versioning

DVC = [sys.executable, "-m", "dvc"]


def _recorded(root):
    return yaml.safe_load((root / "data.dvc").read_text())["outs"][0]["md5"]


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A small copy of the repository layout: git + DVC, a data/ folder tracked by data.dvc."""
    root = tmp_path_factory.mktemp("template") / "repo"
    (root / "data" / "sub").mkdir(parents=True)
    (root / "data" / "a.txt").write_text("one")
    (root / "data" / "sub" / "b.bin").write_bytes(bytes(range(256)))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], cwd=root, check=True)
    subprocess.run([*DVC, "init", "-q"], cwd=root, check=True)
    subprocess.run([*DVC, "add", "-q", "data"], cwd=root, check=True)
    subprocess.run([*git, "add", "data.dvc", ".gitignore", ".dvc"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "data"], cwd=root, check=True)
    return root


@pytest.fixture
def project(template, tmp_path):
    """A fresh copy of the template per test (building one costs seconds of DVC start-up)."""
    return Path(shutil.copytree(template, tmp_path / "repo", symlinks=True))


def test_repository_revision_is_the_md5_in_data_dvc():
    rev = versioning.data_revision(REPO)
    assert rev["md5"] == _recorded(REPO) and rev["md5"].endswith(".dir")
    assert rev["matches"] is True and rev["actual_md5"] == rev["md5"]  # data/ is the recorded revision
    assert len(rev["git_commit"]) == 40 or rev["git_commit"] == "uncommitted"


def test_content_hash_is_dvcs_own_md5(project):
    assert versioning.content_hash(project / "data") == _recorded(project)
    entry = yaml.safe_load((project / "data.dvc").read_text())["outs"][0]
    assert entry["nfiles"] == 2
    assert versioning.content_hash(project / "data" / "a.txt") == "f97c5d29941bfb1b2fdab0874906ab82"  # md5("one")
    with pytest.raises(FileNotFoundError, match="nothing to hash"):
        versioning.content_hash(project / "absent")


def test_modified_copy_is_detected(project):
    rev = versioning.data_revision(project)
    assert rev["matches"] is True and len(rev["git_commit"]) == 40
    assert versioning.data_status(project)["state"] == "up to date"
    (project / "data" / "a.txt").write_text("two")
    rev = versioning.data_revision(project)
    assert rev["md5"] == _recorded(project) and rev["matches"] is False and rev["actual_md5"] != rev["md5"]
    status = versioning.data_status(project)
    assert status["state"] == "modified" and status["changes"]
    shutil.rmtree(project / "data")
    assert versioning.data_status(project)["state"] == "missing"
    assert versioning.data_revision(project)["matches"] is False


def test_untracked_and_broken_pointer_files(tmp_path):
    (tmp_path / "data").mkdir()
    assert versioning.data_revision(tmp_path)["md5"] == "untracked"
    (tmp_path / "data.dvc").write_text("not: [a pointer\n")
    with pytest.raises(ValueError, match="dvc add data"):
        versioning.data_revision(tmp_path)


def test_pull_restores_the_recorded_revision_from_a_remote(project, tmp_path):
    remote = tmp_path / "remote"
    subprocess.run([*DVC, "remote", "add", "-q", "-d", "store", str(remote)], cwd=project, check=True)
    subprocess.run([*DVC, "push", "-q"], cwd=project, check=True)
    shutil.rmtree(project / "data")
    shutil.rmtree(project / ".dvc" / "cache")  # nothing local left: the files must come from the remote
    result = versioning.data_pull(project)
    assert result["source"] == "dvc remote" and result["state"] == "up to date"
    assert (project / "data" / "a.txt").read_text() == "one"
    assert versioning.data_revision(project)["matches"] is True


@pytest.mark.slow
def test_pull_without_a_remote_rebuilds_from_the_offline_sources(tmp_path):
    """No DVC remote (the default here): an altered data/ copy is rebuilt and verified against data.dvc."""
    import numpy as np

    shutil.copy(REPO / "data.dvc", tmp_path / "data.dvc")
    shutil.copytree(REPO / "data", tmp_path / "data")
    labels = tmp_path / "data" / "mnist" / "labels.npy"
    np.save(labels, np.zeros(3, np.int64))
    assert versioning.data_revision(tmp_path)["matches"] is False
    result = versioning.data_pull(tmp_path)
    assert result["source"] == "offline sources" and result["sources"] == {"mnist": "rebuilt", "emoji": "present"}
    assert result["matches"] is True and result["md5"] == _recorded(REPO)
    (tmp_path / "data" / "stray.txt").write_text("x")
    with pytest.raises(RuntimeError, match="stray files"):
        versioning.data_pull(tmp_path)


def test_ensure_data_for_some_sources_writes_only_those(tmp_path, monkeypatch):
    """A fresh pod asking for MNIST gets data/mnist with the recorded bytes, and no emoji (no npm at run time)."""
    from distillery.data.sources import source_matches

    shutil.copy(REPO / "data.dvc", tmp_path / "data.dvc")
    monkeypatch.setenv("DISTILLERY_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("DISTILLERY_SOURCES_DIR", str(tmp_path / "no-sources"))
    from distillery.settings import get_settings

    get_settings.cache_clear()
    try:
        versioning.ensure_data(("mnist",))
        assert source_matches(tmp_path / "data", "mnist") and not (tmp_path / "data" / "emoji").exists()
        assert versioning.data_revision(tmp_path)["md5"] == _recorded(REPO)
    finally:
        get_settings.cache_clear()
