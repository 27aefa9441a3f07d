"""Step functions: what each pipeline step does, joining the method code (models/, papers/) with the
platform (tracking, registry, storage). Components call exactly one of these; tests call them directly."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from distillery.settings import get_settings


def checkpoint_dir(step: str, **key) -> Path:
    """A stable folder for a training step's checkpoints: the same step with the same inputs and parameters,
    started again after an interruption, finds its last checkpoint here and resumes."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = get_settings().home_abs / "checkpoints" / f"{step}-{digest}"
    path.mkdir(parents=True, exist_ok=True)
    return path
