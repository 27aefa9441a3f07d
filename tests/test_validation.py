"""Great Expectations: the image+caption suite passes on good data and names each corruption; the generic runner."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import REPO
from distillery.data import build_image_caption_dataset
from distillery.platform.validation import (DataValidationError, require_valid, run_suite,
                                            validate_image_caption_dataset)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds")
    build_image_caption_dataset(out, sources=("mnist", "emoji"), resolution=16, per_class=8, data_dir=REPO / "data")
    return out


def corrupt_dataset(src, dst, kind):
    """A copy of the dataset at `src` with one kind of damage (test-only: the source code never makes bad data)."""
    shutil.copytree(src, dst)
    z = dict(np.load(dst / "data.npz"))
    captions = json.loads((dst / "captions.json").read_text())
    if kind == "empty_caption":
        captions[5] = "   "
    elif kind == "label_out_of_range":
        z["labels"][0] = 99
    elif kind == "class_imbalance":
        keep = np.ones(len(z["labels"]), bool)
        keep[np.nonzero(z["labels"] == 3)[0][1:]] = False  # class 3 keeps a single image
        z = {k: v[keep] for k, v in z.items()}
        captions = [c for c, k in zip(captions, keep) if k]
    elif kind == "wrong_shape":
        z["images"] = np.zeros((len(z["labels"]), 12, 12, 3), np.uint8)
    elif kind == "grayscale":
        z["images"] = z["images"][..., 0]
    elif kind == "nan":  # only a float array can hold NaN: the suite sees both the dtype and the NaN
        imgs = z["images"].astype(np.float32)
        imgs[2, 0, 0, 0] = np.nan
        z["images"] = imgs
    elif kind == "out_of_range":
        z["images"] = z["images"].astype(np.int16)
        z["images"][4, 1, 1, 1] = 300
    elif kind == "missing_captions":
        captions = captions[:-3]
    elif kind == "bad_split":
        z["split"][7] = 2
    else:
        raise ValueError(kind)
    np.savez(dst / "data.npz", **z)
    (dst / "captions.json").write_text(json.dumps(captions))
    return dst


def test_good_data_passes_with_an_html_report(dataset, tmp_path):
    result = validate_image_caption_dataset(dataset, tmp_path / "r.html")
    assert result.success and result.statistics["failed"] == 0 and not result.failed
    assert result.statistics["rows_images"] == 152 and result.statistics["min_class_count"] == 8
    names = {r.column for r in result.results}
    assert {"dtype", "height", "width", "channels", "pixel_min", "pixel_max", "has_nan", "caption_length", "label",
            "count"} <= names
    page = (tmp_path / "r.html").read_text()
    assert page.startswith("<!doctype html>") and "passed" in page and "FAIL" not in page
    assert "expect_column_values_to_be_between" in page and "caption_length" in page
    assert require_valid(result) is result


@pytest.mark.parametrize("kind,named", [
    ("empty_caption", ["caption_length"]),
    ("label_out_of_range", ["label"]),
    ("class_imbalance", ["count"]),
    ("wrong_shape", ["height", "width"]),
    ("grayscale", ["channels"]),
    ("nan", ["has_nan", "dtype"]),
    ("out_of_range", ["pixel_max", "dtype"]),
    ("missing_captions", ["images/captions", "caption", "caption_length"]),
    ("bad_split", ["split"]),
])
def test_each_corruption_is_rejected_with_the_failed_expectation_named(dataset, tmp_path, kind, named):
    bad = corrupt_dataset(dataset, tmp_path / kind, kind)
    result = validate_image_caption_dataset(bad, tmp_path / "r.html")
    assert not result.success
    assert {r.column for r in result.failed} == set(named)
    with pytest.raises(DataValidationError) as err:
        require_valid(result)
    message = str(err.value)
    for column in named:
        assert f"column '{column}'" in message, message
    assert f"{len(named)} of {len(result.results)} expectations" in message
    assert err.value.result is result
    assert "FAIL" in (tmp_path / "r.html").read_text()


def test_failure_message_carries_the_observed_values(dataset, tmp_path):
    bad = corrupt_dataset(dataset, tmp_path / "bad", "label_out_of_range")
    message = str(DataValidationError(validate_image_caption_dataset(bad, tmp_path / "r.html")))
    assert "expect_column_values_to_be_between on column 'label'" in message
    assert "unexpected=1" in message and "examples=[99]" in message and "max_value=18" in message


def test_missing_files_and_bad_tolerance_are_clear(dataset, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(dataset, broken)
    (broken / "captions.json").unlink()
    with pytest.raises(FileNotFoundError, match="captions.json is missing"):
        validate_image_caption_dataset(broken, tmp_path / "r.html")
    with pytest.raises(ValueError, match="balance_tolerance"):
        validate_image_caption_dataset(dataset, tmp_path / "r.html", balance_tolerance=2)


def test_generic_runner_validates_any_frame():
    """Another dataset kind (e.g. robot demonstrations) brings its own frame and expectations."""
    import great_expectations as gx

    E = gx.expectations
    demos = pd.DataFrame({"episode_length": [50, 61, 0], "success": [True, True, False]})
    expectations = [E.ExpectColumnValuesToBeBetween(column="episode_length", min_value=1),
                    E.ExpectColumnValuesToBeInSet(column="success", value_set=[True, False])]
    result = run_suite("demos", demos, expectations)
    assert not result.success and [r.column for r in result.failed] == ["episode_length"]
    assert result.failed[0].details["examples"] == [0] and result.statistics["rows_data"] == 3
    assert run_suite("demos", demos.iloc[:2], expectations).success
    with pytest.raises(ValueError, match="not passed"):
        run_suite("demos", {"a": demos}, {"b": expectations})
