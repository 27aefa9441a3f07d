"""Step functions: what each pipeline step does, joining the method code (models/, papers/) with the
platform (tracking, registry, storage). Components call exactly one of these; tests call them directly."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from distillery.settings import get_settings


EVALUATOR_FILE = "evaluator.json"  # beside the feature network: which registered evaluator it is


def checkpoint_key(**key) -> str:
    """A short stable digest of a step's inputs and parameters."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def checkpoint_dir(step: str, **key) -> Path | str:
    """A stable folder for a training step's checkpoints: the same step with the same inputs and parameters,
    started again after an interruption (in a new pod too, when the settings' checkpoint_root is s3://), finds
    its last checkpoint here and resumes."""
    name = f"{step}-{checkpoint_key(**key)}"
    root = get_settings().checkpoint_root
    if root and root.startswith("s3://"):
        return f"{root.rstrip('/')}/{name}"
    path = (Path(root).expanduser().resolve() if root else get_settings().home_abs / "checkpoints") / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_dataset(dataset_dir: str):
    """The image-caption dataset artifact a step received."""
    from distillery.data import load_image_caption_dataset

    return load_image_caption_dataset(Path(dataset_dir))


def load_sd_pipeline(model_dir: str, role: str):
    """The diffusers StableDiffusionPipeline folder a step received as its `role` (teacher, base), progress bars
    off; a clear error when it is not one."""
    from diffusers import StableDiffusionPipeline

    if not (Path(model_dir) / "model_index.json").exists():
        raise FileNotFoundError(f"no {role} at {model_dir}: pass a diffusers StableDiffusionPipeline folder")
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def log_metrics(metrics: dict, step: int) -> None:
    """Training-loop log callback: metrics at a step into the step's MLflow run."""
    from distillery.platform import tracking

    tracking.log_metrics(metrics, step=step)


def dir_hash(path: Path) -> str:
    """A short content key of a model folder, so checkpoints of a step trained from another input never mix."""
    from distillery.platform.storage import sha256_file

    return ",".join(sha256_file(p)[:12] for p in sorted(Path(path).rglob("*")) if p.is_file())


def evaluator_identity(feature_net_dir: str) -> dict:
    """Which registered evaluator scores this step: tagged on its run (`evaluator`) and returned as metrics
    (`evaluator_version`, and `evaluator_key`, the number the gate compares: equal keys mean the same network)."""
    import mlflow

    info = json.loads((Path(feature_net_dir) / EVALUATOR_FILE).read_text())
    mlflow.set_tag("evaluator", f"{info['name']} v{info['version']} ({info['alias']})")
    return {"evaluator_version": float(info["version"]), "evaluator_key": float(int(info["key"][:12], 16))}
