"""The Great Expectations suite of the image+caption dataset: shapes, pixel range, no NaN, non-empty captions,
valid labels, class balance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from distillery.platform.validation import ValidationResult, run_suite, write_report


def image_stats(dataset_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Per-image statistics and per-class counts, computed without trusting the data's shape or dtype."""
    dataset_dir = Path(dataset_dir)
    manifest = json.loads((dataset_dir / "manifest.json").read_text())
    with np.load(dataset_dir / "data.npz", allow_pickle=False) as z:
        images, labels = z["images"], z["labels"]
    captions = json.loads((dataset_dir / "captions.json").read_text())
    classes = json.loads((dataset_dir / "classes.json").read_text())
    n = len(images)
    flat = images.reshape(n, -1).astype(np.float64) if n else np.zeros((0, 1))
    shape = lambda i: images.shape[1:] if images.ndim == 4 else (*images.shape[1:], 1)  # noqa: E731
    items = pd.DataFrame({
        "height": [shape(i)[0] for i in range(n)],
        "width": [shape(i)[1] for i in range(n)],
        "channels": [shape(i)[2] if len(shape(i)) > 2 else 1 for i in range(n)],
        "pixel_min": np.nanmin(flat, axis=1) if n else [],
        "pixel_max": np.nanmax(flat, axis=1) if n else [],
        "has_nan": np.isnan(flat).any(axis=1) if n else [],
        "caption": [captions[i] if i < len(captions) else None for i in range(n)],
        "label": labels[:n] if len(labels) >= n else np.pad(labels, (0, n - len(labels)), constant_values=-1),
    })
    items["caption_length"] = items["caption"].fillna("").str.strip().str.len()
    counts = pd.DataFrame({"class": classes,
                           "count": [int((labels == c).sum()) for c in range(len(classes))]})
    return items, counts, manifest


def validate_image_caption_dataset(dataset_dir: Path, report_html: Path, *,
                                   balance_tolerance: float = 0.5) -> ValidationResult:
    import great_expectations as gx

    E = gx.expectations
    items, counts, manifest = image_stats(dataset_dir)
    res = int(manifest["resolution"])
    mean = float(counts["count"].mean()) if len(counts) else 0.0
    expectations = {
        "images": [
            E.ExpectTableRowCountToBeBetween(min_value=1),
            E.ExpectColumnValuesToBeBetween(column="height", min_value=res, max_value=res),
            E.ExpectColumnValuesToBeBetween(column="width", min_value=res, max_value=res),
            E.ExpectColumnValuesToBeInSet(column="channels", value_set=[3]),
            E.ExpectColumnValuesToBeBetween(column="pixel_min", min_value=0, max_value=255),
            E.ExpectColumnValuesToBeBetween(column="pixel_max", min_value=0, max_value=255),
            E.ExpectColumnValuesToBeInSet(column="has_nan", value_set=[False]),
            E.ExpectColumnValuesToNotBeNull(column="caption"),
            E.ExpectColumnValuesToBeBetween(column="caption_length", min_value=1),
            E.ExpectColumnValuesToBeBetween(column="label", min_value=0, max_value=max(0, len(counts) - 1)),
        ],
        "class_counts": [
            E.ExpectTableRowCountToBeBetween(min_value=2),
            E.ExpectColumnValuesToBeBetween(column="count", min_value=mean * (1 - balance_tolerance),
                                            max_value=mean * (1 + balance_tolerance)),
        ],
    }
    result = run_suite("image_captions", {"images": items, "class_counts": counts}, expectations)
    write_report(result, report_html, f"Data validation: {manifest.get('name', 'dataset')} "
                                      f"({manifest.get('num_images', len(items))} images)")
    return result
