"""DVC: which data revision a run used, whether data/ matches it, and how to get it.

data/ is tracked by data.dvc (md5 of the whole folder). `data_pull` uses the DVC remote when one is
configured; without one it rebuilds data/ from the offline sources and verifies the md5 against data.dvc,
so a fresh machine ends up with exactly the recorded revision either way.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from distillery.settings import get_settings


def _paths() -> tuple[Path, Path]:
    data_dir = Path(get_settings().data_dir).resolve()
    return data_dir, data_dir.parent / f"{data_dir.name}.dvc"


def recorded_md5(dvc_file: Path | None = None) -> str:
    dvc_file = dvc_file or _paths()[1]
    if not dvc_file.exists():
        raise FileNotFoundError(f"{dvc_file} not found: data/ is not tracked by DVC here")
    outs = yaml.safe_load(dvc_file.read_text())["outs"]
    return outs[0]["md5"]


def data_revision() -> dict:
    """The md5 recorded in data.dvc and the git commit that last changed data.dvc."""
    _, dvc_file = _paths()
    try:
        md5 = recorded_md5(dvc_file)
    except FileNotFoundError:
        return {"md5": "untracked", "git_commit": "unknown"}
    commit = subprocess.run(["git", "log", "-n", "1", "--format=%H", "--", dvc_file.name], cwd=dvc_file.parent,
                            capture_output=True, text=True).stdout.strip()
    return {"md5": md5, "git_commit": commit or "uncommitted"}


def data_status() -> dict:
    """Compare data/ with data.dvc (DVC computes the folder's md5)."""
    from dvc.repo import Repo

    data_dir, dvc_file = _paths()
    if not data_dir.exists():
        return {"data": str(data_dir), "state": "missing", "fix": "distillery data pull"}
    with Repo(str(dvc_file.parent)) as repo:
        changes = repo.status(targets=[str(dvc_file)])
    return {"data": str(data_dir), "md5": recorded_md5(dvc_file),
            "state": "up to date" if not changes else "modified", "changes": changes}


def data_pull() -> dict:
    from dvc.repo import Repo

    from distillery.data.sources import materialize_raw

    data_dir, dvc_file = _paths()
    with Repo(str(dvc_file.parent)) as repo:
        remotes = repo.config.get("remote", {})
        if remotes:
            repo.pull(targets=[str(dvc_file)])
            return {"source": "dvc remote", **data_status()}
    result = materialize_raw(data_dir, get_settings().home_abs / "npm")
    status = data_status()
    if status["state"] != "up to date":
        raise RuntimeError(f"data/ rebuilt from the offline sources does not match data.dvc ({status['changes']}); "
                           "configure a DVC remote holding the recorded revision")
    return {"source": "offline sources", "sources": result, **status}


def ensure_data() -> None:
    """Materialize data/ when it is absent (a fresh container); leaves an existing data/ alone."""
    data_dir, _ = _paths()
    if not data_dir.exists():
        data_pull()
