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


def _paths(repo_root: Path | str | None = None) -> tuple[Path, Path]:
    """(data folder, its .dvc file): `<repo_root>/data` when a root is given, else the configured data_dir."""
    data_dir = Path(repo_root) / "data" if repo_root is not None else Path(get_settings().data_dir)
    data_dir = data_dir.resolve()
    return data_dir, data_dir.parent / f"{data_dir.name}.dvc"


def recorded_md5(dvc_file: Path | None = None) -> str:
    dvc_file = Path(dvc_file) if dvc_file else _paths()[1]
    if not dvc_file.exists():
        raise FileNotFoundError(f"{dvc_file} not found: data/ is not tracked by DVC here (run `dvc add data`)")
    try:
        return yaml.safe_load(dvc_file.read_text())["outs"][0]["md5"]
    except (KeyError, IndexError, TypeError, yaml.YAMLError) as e:
        raise ValueError(f"{dvc_file} is not a DVC pointer file with outs[0].md5 ({e!r}); "
                         "recreate it with `dvc add data`") from e


def content_hash(path: Path | str) -> str:
    """DVC's md5 of a file, or of a folder ("<md5>.dir", the value `dvc add` records), computed with DVC's own
    hashing code so it compares directly with a .dvc file."""
    from dvc_data.hashfile.hash import file_md5
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.meta import Meta
    from dvc_data.hashfile.tree import Tree

    path = Path(path)
    if path.is_file():
        return file_md5(str(path))
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist: nothing to hash")
    tree = Tree()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        tree.add(f.relative_to(path).parts, Meta(size=f.stat().st_size), HashInfo("md5", file_md5(str(f))))
    tree.digest()
    return tree.hash_info.value


def data_revision(repo_root: Path | str | None = None, *, verify: bool = True) -> dict:
    """The md5 recorded in data.dvc, the git commit that last changed data.dvc, and (with verify) whether the
    working data/ has exactly that content."""
    data_dir, dvc_file = _paths(repo_root)
    try:
        md5 = recorded_md5(dvc_file)
    except FileNotFoundError:
        return {"md5": "untracked", "git_commit": "unknown", "matches": None, "data": str(data_dir)}
    try:
        commit = subprocess.run(["git", "log", "-n", "1", "--format=%H", "--", dvc_file.name], cwd=dvc_file.parent,
                                capture_output=True, text=True).stdout.strip()
    except OSError:  # no git in the image: the md5 is the revision; the image's own commit is tagged on the run
        commit = "unknown"
    rev = {"md5": md5, "git_commit": commit or "uncommitted", "data": str(data_dir)}
    if verify:
        actual = content_hash(data_dir) if data_dir.exists() else "missing"
        rev.update(matches=actual == md5, actual_md5=actual)
    return rev


def _dvc_repo(root: Path):
    """DVC's Repo at `root`; outside a git checkout (the image's /app) DVC runs with `no_scm`, which it otherwise
    refuses with "not a git repository"."""
    from dvc.repo import Repo

    root = Path(root).resolve()
    in_git = any((p / ".git").exists() for p in (root, *root.parents))
    return Repo(str(root), config=None if in_git else {"core": {"no_scm": True}})


def data_status(repo_root: Path | str | None = None) -> dict:
    """Compare data/ with data.dvc (`dvc status` on the pointer file)."""
    data_dir, dvc_file = _paths(repo_root)
    if not data_dir.exists():
        return {"data": str(data_dir), "state": "missing", "fix": "distillery data pull"}
    with _dvc_repo(dvc_file.parent) as repo:
        changes = repo.status(targets=[str(dvc_file)])
    return {"data": str(data_dir), "md5": recorded_md5(dvc_file),
            "state": "up to date" if not changes else "modified", "changes": changes}


def data_pull(repo_root: Path | str | None = None, sources: tuple[str, ...] | None = None) -> dict:
    """Bring data/ to the revision in data.dvc: `dvc pull` from the configured remote, or, with no remote, rebuild
    it from the offline sources and check that DVC's md5 of the result equals the recorded one. With `sources`,
    only those are rebuilt, each checked against its recorded file hashes (the folder md5 covers all of them)."""
    from distillery.data.sources import materialize_raw

    data_dir, dvc_file = _paths(repo_root)
    if (dvc_file.parent / ".dvc").is_dir():
        with _dvc_repo(dvc_file.parent) as repo:
            if repo.config.get("remote", {}):
                repo.pull(targets=[str(dvc_file)])
                return {"source": "dvc remote", **data_status(repo_root)}
    result = materialize_raw(data_dir, get_settings().sources_path, sources)
    rev = data_revision(repo_root)
    if sources is not None:
        return {"source": "offline sources", "sources": result, "state": "partial", **rev}
    if rev["md5"] != "untracked" and not rev["matches"]:
        raise RuntimeError(f"data/ rebuilt from the offline sources has md5 {rev['actual_md5']}, but data.dvc records "
                           f"{rev['md5']}: remove stray files under data/, or configure a DVC remote holding the "
                           "recorded revision (`dvc remote add -d NAME URL`)")
    return {"source": "offline sources", "sources": result, "state": "up to date" if rev["matches"] else "untracked",
            **rev}


def ensure_data(sources: tuple[str, ...] | None = None) -> None:
    """Materialize data/ (or only `sources` of it) when absent, as in a fresh container; leaves present data alone."""
    from distillery.data.sources import source_matches

    data_dir, _ = _paths()
    if sources is None:
        if not data_dir.exists():
            data_pull()
    elif not all(source_matches(data_dir, s) for s in sources):
        data_pull(sources=sources)
