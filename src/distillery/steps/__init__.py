"""Step functions: what each pipeline step does, joining the method code (models/, papers/) with the
platform (tracking, registry, storage). Components call exactly one of these; tests call them directly."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from distillery.settings import get_settings


def checkpoint_dir(step: str, **key) -> Path | str:
    """A stable folder for a training step's checkpoints: the same step with the same inputs and parameters,
    started again after an interruption (in a new pod too, when the settings' checkpoint_root is s3://), finds
    its last checkpoint here and resumes."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    root = get_settings().checkpoint_root
    if root and root.startswith("s3://"):
        return f"{root.rstrip('/')}/{step}-{digest}"
    path = (Path(root).expanduser().resolve() if root else get_settings().home_abs / "checkpoints") / f"{step}-{digest}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_dataset(dataset_dir: str):
    """The image-caption dataset artifact a step received."""
    from distillery.data import load_image_caption_dataset

    return load_image_caption_dataset(Path(dataset_dir))


def log_metrics(metrics: dict, step: int) -> None:
    """Training-loop log callback: metrics at a step into the step's MLflow run."""
    from distillery.platform import tracking

    tracking.log_metrics(metrics, step=step)


def dir_hash(path: Path) -> str:
    """A short content key of a model folder, so checkpoints of a step trained from another input never mix."""
    from distillery.platform.storage import sha256_file

    return ",".join(sha256_file(p)[:12] for p in sorted(Path(path).rglob("*")) if p.is_file())
