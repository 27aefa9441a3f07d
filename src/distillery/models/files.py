"""File modes for saved models.

safetensors (and other atomic writers) write a private temp file and rename it, so weights end up mode 0600. A
model folder is read by other uids (a predictor mounting a volume another pod wrote, `pvc://`), so it is opened
up after saving: files a+r, folders a+rx. Nothing gains write access.
"""

from __future__ import annotations

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
