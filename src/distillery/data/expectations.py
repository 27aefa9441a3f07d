"""The Great Expectations suite of the image+caption dataset: dtype, shapes, pixel range, no NaN, non-empty captions,
valid labels and split, consistent lengths, class balance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from distillery.platform.validation import ValidationResult, run_suite, write_report

_CHUNK = 4096  # images per block when computing stats, so a large dataset is never copied to float64 at once


def _read_json(path: Path):
    if not path.exists():
        raise FileNotFoundError(f"{path.parent} is not an image+caption dataset: {path.name} is missing "
                                "(build it with distillery.data.build_image_caption_dataset)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); rebuild the dataset") from e


def image_stats(dataset_dir: Path) -> dict[str, pd.DataFrame | dict]:
    """Per-image statistics, per-class counts and array lengths, computed without trusting the data's shape or
    dtype (a corrupt dataset must still be described, not crash the description)."""
    dataset_dir = Path(dataset_dir)
    manifest = _read_json(dataset_dir / "manifest.json")
    if not (dataset_dir / "data.npz").exists():
        raise FileNotFoundError(f"{dataset_dir} is not an image+caption dataset: data.npz is missing")
    with np.load(dataset_dir / "data.npz", allow_pickle=False) as z:
        images, labels = z["images"], np.asarray(z["labels"]).reshape(-1)
        split = np.asarray(z["split"]).reshape(-1) if "split" in z else np.full(len(labels), -1)
    captions = _read_json(dataset_dir / "captions.json")
    classes = _read_json(dataset_dir / "classes.json")
    n = len(images)
    shape = tuple(images.shape[1:]) + (1,) * max(0, 3 - (images.ndim - 1))  # grayscale (N, H, W) -> channels 1
    mins, maxs, nans = np.zeros(n), np.zeros(n), np.zeros(n, dtype=bool)
    for start in range(0, n, _CHUNK):
        block = images[start:start + _CHUNK].reshape(min(_CHUNK, n - start), -1).astype(np.float64)
        nans[start:start + len(block)] = np.isnan(block).any(axis=1)
        if block.shape[1]:  # NaN is reported by has_nan; the range is over the remaining pixels
            mins[start:start + len(block)] = np.where(np.isnan(block), np.inf, block).min(axis=1)
            maxs[start:start + len(block)] = np.where(np.isnan(block), -np.inf, block).max(axis=1)
    pad = lambda a, fill: np.concatenate([a[:n], np.full(max(0, n - len(a)), fill)])  # noqa: E731
    items = pd.DataFrame({
        "dtype": [str(images.dtype)] * n,
        "height": [shape[0]] * n,
        "width": [shape[1]] * n,
        "channels": [shape[2] if len(shape) == 3 else -1] * n,  # -1: more than 3 dimensions per image
        "pixel_min": mins,
        "pixel_max": maxs,
        "has_nan": nans,
        "caption": [captions[i] if i < len(captions) and isinstance(captions[i], str) else None for i in range(n)],
        "label": pad(labels.astype(np.int64), -1),
        "split": pad(split.astype(np.int64), -1),
    })
    items["caption_length"] = items["caption"].fillna("").str.strip().str.len()
    counts = pd.DataFrame({"class": classes, "count": [int((labels == c).sum()) for c in range(len(classes))]})
    lengths = pd.DataFrame({"images": [n], "labels": [len(labels)], "split": [len(split)], "captions": [len(captions)],
                            "class_prompts": [len(_read_json(dataset_dir / "class_prompts.json"))],
                            "classes": [len(classes)]})
    return {"images": items, "class_counts": counts, "lengths": lengths, "manifest": manifest}


def image_caption_expectations(resolution: int, num_classes: int, mean_count: float, balance_tolerance: float) -> dict:
    import great_expectations as gx

    E = gx.expectations
    return {
        "images": [
            E.ExpectTableRowCountToBeBetween(min_value=1),
            E.ExpectColumnValuesToBeInSet(column="dtype", value_set=["uint8"]),
            E.ExpectColumnValuesToBeBetween(column="height", min_value=resolution, max_value=resolution),
            E.ExpectColumnValuesToBeBetween(column="width", min_value=resolution, max_value=resolution),
            E.ExpectColumnValuesToBeInSet(column="channels", value_set=[3]),
            E.ExpectColumnValuesToBeBetween(column="pixel_min", min_value=0, max_value=255),
            E.ExpectColumnValuesToBeBetween(column="pixel_max", min_value=0, max_value=255),
            E.ExpectColumnValuesToBeInSet(column="has_nan", value_set=[False]),
            E.ExpectColumnValuesToNotBeNull(column="caption"),
            E.ExpectColumnValuesToBeBetween(column="caption_length", min_value=1),
            E.ExpectColumnValuesToBeBetween(column="label", min_value=0, max_value=max(0, num_classes - 1)),
            E.ExpectColumnValuesToBeInSet(column="split", value_set=[0, 1]),
        ],
        "class_counts": [
            E.ExpectTableRowCountToBeBetween(min_value=2),
            E.ExpectColumnValuesToBeBetween(column="count", min_value=mean_count * (1 - balance_tolerance),
                                            max_value=mean_count * (1 + balance_tolerance)),
        ],
        "lengths": [E.ExpectColumnPairValuesToBeEqual(column_A="images", column_B=other)
                    for other in ("labels", "split", "captions")]
                   + [E.ExpectColumnPairValuesToBeEqual(column_A="classes", column_B="class_prompts")],
    }


def validate_image_caption_dataset(dataset_dir: Path, report_html: Path, *,
                                   balance_tolerance: float = 0.5) -> ValidationResult:
    """Run the suite, write the HTML report, return the result (raise with `require_valid` to stop on failure).

    balance_tolerance: each class count must lie within mean * (1 +- tolerance).
    """
    if not 0.0 <= balance_tolerance <= 1.0:
        raise ValueError(f"balance_tolerance={balance_tolerance} must be in [0, 1] (0.5 allows +-50% of the mean)")
    stats = image_stats(dataset_dir)
    manifest, counts = stats.pop("manifest"), stats["class_counts"]
    if "resolution" not in manifest:
        raise ValueError(f"{dataset_dir}/manifest.json has no 'resolution'; rebuild the dataset")
    mean = float(counts["count"].mean()) if len(counts) else 0.0
    expectations = image_caption_expectations(int(manifest["resolution"]), len(counts), mean, balance_tolerance)
    result = run_suite("image_captions", stats, expectations)
    result.statistics.update(num_classes=len(counts), mean_class_count=round(mean, 2),
                             min_class_count=int(counts["count"].min()) if len(counts) else 0,
                             max_class_count=int(counts["count"].max()) if len(counts) else 0)
    write_report(result, report_html, f"Data validation: {manifest.get('name', 'dataset')} "
                                      f"({len(stats['images'])} images)")
    return result
