"""Data steps: materialize a dataset artifact with its data revision, validate it with Great Expectations."""

from __future__ import annotations

import json
from pathlib import Path


def prepare_image_captions(*, out_dir: str, sources: str, resolution: int, per_class: int, holdout_fraction: float,
                           seed: int, dataset_uri: str = "") -> dict:
    """Build the image+caption dataset from data/ (or copy the one at `dataset_uri`) and record its lineage."""
    from distillery.data import build_image_caption_dataset, load_image_caption_dataset
    from distillery.models.image_eval import make_grid
    from distillery.platform import storage, tracking, versioning
    from distillery.settings import get_settings

    out = Path(out_dir)
    if dataset_uri:
        storage.download(dataset_uri, out)
        if not (out / "manifest.json").exists():
            raise FileNotFoundError(f"{dataset_uri} is not a dataset artifact: it has no manifest.json")
    else:
        wanted = tuple(s.strip() for s in sources.split(",") if s.strip())
        versioning.ensure_data(wanted)
        build_image_caption_dataset(out, sources=wanted, resolution=resolution,
                                    per_class=per_class, holdout_fraction=holdout_fraction, seed=seed,
                                    data_dir=get_settings().data_dir)
    manifest = json.loads((out / "manifest.json").read_text())
    revision = versioning.data_revision()
    tracking.set_data_revision(revision.get("md5", "unknown"), manifest.get("content_sha256", ""),
                               dataset=f"{manifest.get('name', 'image-captions')}-{'-'.join(manifest.get('sources', []))}")
    ds = load_image_caption_dataset(out)
    first = [int(i) for c in range(len(ds.classes)) for i in (ds.labels == c).nonzero()[0][:4]]
    tracking.log_image(make_grid([ds.images[i] for i in first], nrow=4), "dataset_samples.png")
    tracking.log_dict(manifest, "manifest.json")
    return {"num_images": int(manifest["num_images"]), "num_classes": int(manifest["num_classes"])}


def validate_image_captions(*, dataset_dir: str, report_path: str, balance_tolerance: float) -> dict:
    """Great Expectations suite over the dataset; a failure stops the DAG here and names every failed expectation."""
    from distillery.data.expectations import validate_image_caption_dataset

    result = validate_image_caption_dataset(Path(dataset_dir), Path(report_path), balance_tolerance=balance_tolerance)
    return enforce_validation(result, report_path)


def enforce_validation(result, report_path: str) -> dict:
    """Log the suite's HTML report to the step's run, then stop the DAG if any expectation failed."""
    from distillery.platform import tracking
    from distillery.platform.validation import DataValidationError

    tracking.log_html(Path(report_path), "validation_report.html")
    if not result.success:
        raise DataValidationError(result)
    return {"expectations": float(len(result.results)), "expectations_failed": 0.0}
