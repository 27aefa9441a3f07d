"""A generated array set on disk, the folder a data step outputs (smdp-nav's scenarios, teacher-prior's rollouts):
NAME.npz, never pickled, beside a manifest.json that records the file's sha256 and how the set was made."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np


def write_npz(path: Path, arrays: dict) -> str:
    """`arrays` to `path` (its folder made) -> the file's sha256, which the set's manifest records."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_manifest(folder: Path, manifest: dict) -> dict:
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def read_array_set(folder: Path, name: str, what: str) -> tuple[dict, dict]:
    """(arrays of FOLDER/NAME, its manifest); a folder without NAME is refused, naming `what` was expected."""
    folder = Path(folder)
    if not (folder / name).exists():
        raise FileNotFoundError(f"{folder} holds no {what} ({name} missing)")
    with np.load(folder / name, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return arrays, json.loads((folder / "manifest.json").read_text())
