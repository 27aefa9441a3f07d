"""Feature network, Frechet distance, conditional accuracy plumbing."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import REPO
from distillery.data import build_image_caption_dataset, load_image_caption_dataset
from distillery.models import image_eval


def test_frechet_distance_is_zero_for_the_same_set_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 8))
    assert image_eval.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    d1 = image_eval.frechet_distance(a, a + 0.5)
    d2 = image_eval.frechet_distance(a, a + 1.0)
    assert d1 == pytest.approx(8 * 0.25, rel=1e-3) and d2 > d1
    with pytest.raises(ValueError, match="at least 2"):
        image_eval.frechet_distance(a[:1], a)


def test_feature_net_learns_real_digits_and_round_trips(tmp_path):
    build_image_caption_dataset(tmp_path / "ds", sources=("mnist",), resolution=16, per_class=60, data_dir=REPO / "data")
    ds = load_image_caption_dataset(tmp_path / "ds")
    tr, ho = ds.train(), ds.holdout()
    net = image_eval.train_feature_net(tr.images, tr.labels, 10, steps=150, seed=0)
    acc = (net.predict(ho.images) == ho.labels).mean()
    assert acc > 0.6, acc  # chance is 0.1
    net.save(tmp_path / "fn")
    again = image_eval.FeatureNet.load(tmp_path / "fn")
    np.testing.assert_allclose(again.features(ho.images), net.features(ho.images), atol=1e-6)
    # Real held-out digits sit closer to real training digits than noise does.
    noise = np.random.default_rng(0).integers(0, 256, ho.images.shape, dtype=np.uint8)
    real = image_eval.frechet_distance(net.features(ho.images), net.features(tr.images))
    fake = image_eval.frechet_distance(net.features(noise), net.features(tr.images))
    assert real < fake


def test_grid_has_the_expected_layout():
    imgs = [np.full((8, 8, 3), i * 20, np.uint8) for i in range(10)]
    grid = image_eval.make_grid(imgs, nrow=4)
    w, h = grid.size
    assert w / h == pytest.approx((4 * 10 + 2) / (3 * 10 + 2), rel=0.01)
