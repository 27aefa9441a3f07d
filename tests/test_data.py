"""Dataset artifact, Great Expectations suite, DVC data revision."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from distillery.data import build_image_caption_dataset, load_image_caption_dataset
from distillery.data.expectations import validate_image_caption_dataset
from distillery.platform.validation import DataValidationError


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds")
    build_image_caption_dataset(out, sources=("mnist", "emoji"), resolution=16, per_class=10, data_dir=REPO / "data")
    return out


def test_dataset_round_trip_is_balanced_and_captioned(dataset):
    ds = load_image_caption_dataset(dataset)
    assert ds.images.shape == (190, 16, 16, 3) and ds.images.dtype == np.uint8
    assert len(ds.classes) == 19 and len(ds.class_prompts) == 19
    assert np.bincount(ds.labels).tolist() == [10] * 19
    assert all(c.strip() for c in ds.captions)
    assert "seven" in ds.captions[int(np.nonzero(ds.labels == 7)[0][0])]
    assert len(ds.holdout()) == 19 and len(ds.train()) == 171  # one held out per class
    assert set(np.unique(ds.holdout().labels)) == set(range(19))


def test_dataset_is_deterministic(dataset, tmp_path):
    m = build_image_caption_dataset(tmp_path, sources=("mnist", "emoji"), resolution=16, per_class=10,
                                    data_dir=REPO / "data")
    assert m["content_sha256"] == json.loads((dataset / "manifest.json").read_text())["content_sha256"]
    other = build_image_caption_dataset(tmp_path / "b", sources=("mnist",), resolution=16, per_class=10, seed=1,
                                        data_dir=REPO / "data")
    assert other["content_sha256"] != m["content_sha256"]


def test_unknown_source_and_missing_data_are_clear(tmp_path):
    with pytest.raises(ValueError, match="unknown source"):
        build_image_caption_dataset(tmp_path, sources=("cifar",), data_dir=REPO / "data")
    with pytest.raises(FileNotFoundError, match="data pull"):
        build_image_caption_dataset(tmp_path, sources=("mnist",), data_dir=tmp_path / "nothing")


def test_good_data_passes_with_an_html_report(dataset, tmp_path):
    result = validate_image_caption_dataset(dataset, tmp_path / "r.html")
    assert result.success and result.statistics["failed"] == 0
    html = (tmp_path / "r.html").read_text()
    assert "passed" in html and "expect_column_values_to_be_between" in html


def _corrupt(src, dst, kind):
    shutil.copytree(src, dst)
    z = dict(np.load(dst / "data.npz"))
    captions = json.loads((dst / "captions.json").read_text())
    if kind == "caption":
        captions[5] = "   "
    elif kind == "label":
        z["labels"][0] = 99
    elif kind == "imbalance":
        keep = np.ones(len(z["labels"]), bool)
        keep[np.nonzero(z["labels"] == 3)[0][1:]] = False  # class 3 keeps a single image
        z = {k: v[keep] for k, v in z.items()}
        captions = [c for c, k in zip(captions, keep) if k]
    elif kind == "shape":
        z["images"] = np.zeros((len(z["labels"]), 12, 12, 3), np.uint8)
    elif kind == "nan":
        imgs = z["images"].astype(np.float32)
        imgs[2, 0, 0, 0] = np.nan
        z["images"] = imgs
    np.savez(dst / "data.npz", **z)
    (dst / "captions.json").write_text(json.dumps(captions))
    return dst


@pytest.mark.parametrize("kind,named", [
    ("caption", "caption_length"), ("label", "label"), ("imbalance", "count"), ("shape", "height"),
    ("nan", "has_nan")])
def test_each_corruption_is_rejected_with_the_failed_expectation_named(dataset, tmp_path, kind, named):
    bad = _corrupt(dataset, tmp_path / kind, kind)
    result = validate_image_caption_dataset(bad, tmp_path / "r.html")
    assert not result.success
    message = str(DataValidationError(result))
    assert f"column '{named}'" in message, message
    assert "FAIL" in (tmp_path / "r.html").read_text()


def test_data_revision_comes_from_data_dvc():
    from distillery.platform import versioning

    rev = versioning.data_revision()
    recorded = (REPO / "data.dvc").read_text()
    assert rev["md5"].endswith(".dir") and rev["md5"] in recorded


def test_data_status_detects_a_modified_copy(tmp_path, monkeypatch):
    """A small DVC project in a temp folder: tracked data, then one file changed."""
    dvc = [sys.executable, "-m", "dvc"]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("one")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*dvc, "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*dvc, "add", "-q", "data"], cwd=tmp_path, check=True)
    from distillery.platform import versioning
    from distillery.settings import get_settings

    monkeypatch.setenv("DISTILLERY_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    try:
        assert versioning.data_status()["state"] == "up to date"
        (tmp_path / "data" / "a.txt").write_text("two")
        assert versioning.data_status()["state"] == "modified"
    finally:
        get_settings.cache_clear()
