"""File modes and recorded hashes for saved models.

safetensors (and other atomic writers) write a private temp file and rename it, so weights end up mode 0600. A
model folder is read by other uids (a predictor mounting a volume another pod wrote, `pvc://`), so it is opened
up after saving: files a+r, folders a+rx. Nothing gains write access. `seal` also records each file's sha256, and a
predictor refuses a folder whose files no longer match (`verify`).
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path


def share_readable(path: Path | str) -> Path:
    """Make `path` (a file, or a folder and everything under it) readable by every uid; returns `path`."""
    path = Path(path)
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        mode = p.stat().st_mode
        extra = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH
        if p.is_dir():
            extra |= stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH
        if mode & extra != extra:
            os.chmod(p, stat.S_IMODE(mode) | extra)
    return path


HASHES = "files.sha256"  # `sha256sum -c files.sha256` checks a folder by hand too


class ModelFilesMismatch(ValueError):
    """A model folder's files differ from the sha256 recorded when it was saved."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def seal(path: Path | str) -> Path:
    """Record the sha256 of every file in a saved model folder (in `files.sha256`, sha256sum's format) and make
    the folder readable by every uid; call it once the folder is complete. Returns `path`."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != HASHES)
    (path / HASHES).write_text("".join(f"{_sha256(p)}  {p.relative_to(path).as_posix()}\n" for p in files))
    return share_readable(path)


def verify(path: Path | str) -> bool:
    """Check a model folder against its recorded hashes. Raises ModelFilesMismatch naming every changed, missing or
    unrecorded file; returns False when the folder has no record (saved before hashes were kept, or imported)."""
    path = Path(path)
    record = path / HASHES
    if not record.exists():
        return False
    want = {}
    for line in record.read_text().splitlines():
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            raise ModelFilesMismatch(f"{record}: malformed line {line!r}")
        want[name] = digest
    have = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and p.name != HASHES}
    problems = [f"missing: {n}" for n in sorted(set(want) - have)]
    problems += [f"not recorded: {n}" for n in sorted(have - set(want))]
    problems += [f"sha256 differs: {n}" for n in sorted(set(want) & have) if _sha256(path / n) != want[n]]
    if problems:
        raise ModelFilesMismatch(f"{path} does not match {HASHES} (refusing to load it): " + "; ".join(problems))
    return True
