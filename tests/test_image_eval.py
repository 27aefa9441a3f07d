"""Feature network, Frechet distance, conditional accuracy plumbing."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from conftest import REPO
from distillery.data import build_image_caption_dataset, load_image_caption_dataset
from distillery.models import image_eval, tiny_sd


pytestmark = pytest.mark.usefixtures("one_thread")


def test_frechet_distance_is_zero_for_the_same_set_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 8))
    assert image_eval.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    d1 = image_eval.frechet_distance(a, a + 0.5)
    d2 = image_eval.frechet_distance(a, a + 1.0)
    assert d1 == pytest.approx(8 * 0.25, rel=1e-3) and d2 > d1
    with pytest.raises(ValueError, match="at least 2"):
        image_eval.frechet_distance(a[:1], a)
    with pytest.raises(ValueError, match="same feature size"):
        image_eval.frechet_distance(a, a[:, :4])


def test_frechet_distance_matches_the_sqrtm_formula_and_stays_finite_with_few_samples():
    from scipy import linalg

    rng = np.random.default_rng(1)
    a = rng.normal(size=(300, 12))
    b = rng.normal(size=(200, 12)) @ rng.normal(size=(12, 12)) * 0.5 + 0.3
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a + s_b - 2 * linalg.sqrtm(s_a @ s_b).real)
    assert image_eval.frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)
    # Fewer samples than dimensions: singular covariances, still a finite non-negative real number.
    few = image_eval.frechet_distance(rng.normal(size=(3, 128)), rng.normal(size=(4, 128)) + 1.0)
    assert np.isfinite(few) and few > 128 * 0.5


class _Projection:
    """A fixed random projection of the pixels: a feature extractor with known features."""

    def __init__(self, dim=16):
        self.w = np.random.default_rng(3).normal(size=(8 * 8 * 3, dim))

    def features(self, images):
        return (np.asarray(images, np.float64).reshape(len(images), -1) / 255.0) @ self.w


def test_torchmetrics_fid_equals_the_hand_written_distance_and_kid_orders_shifts():
    rng = np.random.default_rng(0)
    real = rng.integers(0, 200, (120, 8, 8, 3)).astype(np.uint8)
    near = np.clip(rng.integers(0, 200, (100, 8, 8, 3)) + 5, 0, 255).astype(np.uint8)
    far = np.clip(rng.integers(0, 200, (100, 8, 8, 3)) + 40, 0, 255).astype(np.uint8)
    proj = _Projection()
    lib = image_eval.distribution_metrics(proj, near, real)
    ours = image_eval.frechet_distance(proj.features(near), proj.features(real))
    assert lib["fd"] == pytest.approx(ours, rel=1e-5)  # the bootstrap's hand-written FD is torchmetrics' FD
    farther = image_eval.distribution_metrics(proj, far, real)
    assert farther["fd"] > lib["fd"] and farther["kid"] > lib["kid"] > -0.01
    assert image_eval.distribution_metrics(proj, near, real) == lib  # KID's subsets are seeded
    with pytest.raises(ValueError, match="at least 2 samples"):
        image_eval.distribution_metrics(proj, near[:1], real)


def test_bootstrap_interval_covers_the_estimate_and_narrows_with_more_samples():
    rng = np.random.default_rng(1)
    small, large = rng.random(40) < 0.7, rng.random(4000) < 0.7
    lo, hi = image_eval.bootstrap_ci(np.mean, small.astype(float))
    assert lo <= small.mean() <= hi
    lo2, hi2 = image_eval.bootstrap_ci(np.mean, large.astype(float))
    assert lo2 <= large.mean() <= hi2 and (hi2 - lo2) < (hi - lo) / 4
    assert image_eval.bootstrap_ci(np.mean, small.astype(float)) == (lo, hi)  # seeded


def test_feature_net_learns_real_digits_and_round_trips(tmp_path):
    build_image_caption_dataset(tmp_path / "ds", sources=("mnist",), resolution=16, per_class=60,
                                data_dir=REPO / "data")
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


@dataclass
class Squares:
    """Two classes any network separates: bright and dark squares, with a prompt for each."""
    images: np.ndarray
    labels: np.ndarray
    class_prompts: list = field(default_factory=lambda: ["a bright square", "a dark square"])


def _squares(n, seed):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    base = np.where(labels == 0, 220, 35)[:, None, None, None]
    images = np.clip(base + rng.integers(-20, 21, (n, 16, 16, 3)), 0, 255).astype(np.uint8)
    return Squares(images, labels)


@pytest.fixture(scope="module")
def squares_net():
    train = _squares(64, 0)
    return image_eval.train_feature_net(train.images, train.labels, 2, steps=30, batch_size=16, seed=0)


def test_evaluation_reports_quality_cost_and_a_grid(squares_net, tmp_path):
    holdout = _squares(8, 1)
    assert (squares_net.predict(holdout.images) == holdout.labels).all()
    pipe = tiny_sd.build_pipeline(tiny_sd.TinySDConfig(resolution=16, vae_channels=(8, 16, 16), vae_norm_groups=4,
                                                       unet_channels=(16, 32), norm_groups=8))
    kw = dict(num_per_class=2, steps=3, seed=0)
    guided = image_eval.evaluate_text_to_image(pipe, holdout, squares_net, guidance_scale=3.0, **kw)
    assert guided["num_generated"] == 4
    assert guided["unet_evals_per_image"] == 6  # guidance doubles the UNet batch at every step
    assert np.isfinite(guided["fd"]) and guided["fd"] > 0 and 0 <= guided["cond_acc"] <= 1 and guided["latency_s"] > 0
    assert guided["latency_batch_s"] > 0 and np.isfinite(guided["kid"])  # batch-1 latency and amortized, apart
    assert guided["fd_ci_low"] <= guided["fd_ci_high"] and 0 <= guided["cond_acc_ci_low"] <= guided["cond_acc_ci_high"] <= 1
    side = (2 * (16 + 2) + 2) * 16  # 2 samples per row, 2 class rows, 2 px padding, upscaled x16
    assert guided["grid"].size == (side, side)
    again = image_eval.evaluate_text_to_image(pipe, holdout, squares_net, guidance_scale=3.0, **kw)
    assert again["fd"] == pytest.approx(guided["fd"])  # fixed seeds: the same images every time
    plain = image_eval.evaluate_text_to_image(pipe, holdout, squares_net, guidance_scale=1.0, **kw)
    assert plain["unet_evals_per_image"] == 3

    # CLIP features when a user has a CLIP vision model on disk (here a tiny random one, saved like a real one).
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    clip_cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=32, patch_size=8, projection_dim=16)
    CLIPVisionModelWithProjection(clip_cfg).save_pretrained(tmp_path / "clip")
    with_clip = image_eval.evaluate_text_to_image(pipe, holdout, squares_net, guidance_scale=3.0,
                                                  clip_path=tmp_path / "clip", **kw)
    assert np.isfinite(with_clip["fd_clip"]) and with_clip["fd_clip"] > 0
    assert with_clip["fd"] == pytest.approx(guided["fd"])
    assert image_eval.ClipFeatures(tmp_path / "clip").features(holdout.images).shape == (8, 16)


def test_evaluation_refuses_bad_inputs_before_sampling(squares_net, tmp_path):
    holdout = _squares(8, 1)
    with pytest.raises(FileNotFoundError, match="no CLIP vision model"):
        image_eval.evaluate_text_to_image(object(), holdout, squares_net, num_per_class=2, steps=2,
                                          guidance_scale=3.0, clip_path=tmp_path / "missing")
    three = Squares(holdout.images, holdout.labels, ["a", "b", "c"])
    with pytest.raises(ValueError, match="knows 2 classes"):
        image_eval.evaluate_text_to_image(object(), three, squares_net, num_per_class=2, steps=2, guidance_scale=3.0)
    with pytest.raises(FileNotFoundError, match="no feature network"):
        image_eval.FeatureNet.load(tmp_path / "nothing")
    with pytest.raises(ValueError, match="labels must lie"):
        image_eval.train_feature_net(holdout.images, holdout.labels + 5, 2, steps=1)
