"""The swift-diffusion pipeline's parameter checks and its steps, run in-process on an untrained 16 px base and a few
MNIST images (seconds): add-on training, evaluation against the base, the registered add-on store, and the serving
evaluation that assembles the runtime release the predictor serves. The whole DAG runs once, in containers
(tests/integration/test_swift_diffusion_in_containers.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from distillery.models import tiny_sd

CFG = tiny_sd.TinySDConfig(resolution=16, vae_channels=(8, 16, 16), vae_norm_groups=4, unet_channels=(16, 32),
                           norm_groups=8)
TRAIN = dict(lora_steps=2, lora_rank=2, lora_lr=1e-3, controlnet_steps=2, controlnet_lr=5e-4, batch_size=4,
             cond_dropout=0.1, seed=0)

pytestmark = pytest.mark.usefixtures("one_thread")


def _resolve(profile="smoke", **overrides):
    from pipelines.params import resolve
    from pipelines.swift_diffusion import swift_diffusion

    return resolve("swift-diffusion", swift_diffusion, profile, overrides)


def test_every_profile_resolves_and_bad_addon_lists_are_refused_before_any_step():
    from pipelines.params import PROFILES, ParameterError

    for profile in PROFILES["swift-diffusion"]:
        _resolve(profile)
    assert _resolve()["addons"] == ["controlnet/edges", "lora/inverted", "lora/thick", "lora/tint"]
    for addons, words in ((["controlnet/edges", "lora/sepia"], "lora/<style>"),
                          (["lora/inverted", "lora/tint"], "must include the ControlNet"),
                          (["controlnet/edges", "lora/tint", "lora/tint"], "each add-on once"),
                          (["controlnet/canny", "lora/tint"], "controlnet/edges")):
        with pytest.raises(ParameterError, match=words):
            _resolve(addons=addons)
    with pytest.raises(ParameterError, match="wait_fraction"):
        _resolve(wait_fraction=1.0)


def test_summary_bounds_the_worst_lora_and_the_controlnets_edge_gain():
    from distillery.steps.swift_diffusion import summarize_addons

    s = summarize_addons([json.dumps({"lora_tint_style_fd_ratio": 0.5}), {"lora_thick_style_fd_ratio": 0.8},
                          {"controlnet_edges_edge_f1": 0.6, "controlnet_edges_base_edge_f1": 0.2}])
    assert s["lora_style_fd_ratio_max"] == 0.8
    assert s["controlnet_edges_edge_f1_gain"] == pytest.approx(0.4)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 16 px MNIST dataset (2 classes kept small), an untrained base of that size and the evaluator."""
    from distillery.data import build_image_caption_dataset
    from distillery.models import image_eval
    from distillery.settings import get_settings
    from distillery.steps import EVALUATOR_FILE, load_dataset

    root = tmp_path_factory.mktemp("swift")
    build_image_caption_dataset(root / "data", sources=("mnist",), resolution=16, per_class=4, holdout_fraction=0.5,
                                seed=0, data_dir=get_settings().data_dir)
    ds = load_dataset(str(root / "data"))
    tiny_sd.build_pipeline(CFG, seed=0).save_pretrained(root / "base")
    net = image_eval.train_feature_net(ds.images, ds.labels, len(ds.classes), steps=2, seed=0)
    net.save(root / "net")
    (root / "net" / EVALUATOR_FILE).write_text(json.dumps({"name": "evaluator-test", "version": "1",
                                                           "key": "0" * 16, "alias": "rev-test"}))
    return root


def test_steps_train_evaluate_register_and_release_the_addons(world, home, tmp_path):
    import mlflow

    from distillery.platform import registry, tracking
    from distillery.serving.swift_diffusion import SwiftDiffusionModel
    from distillery.steps import swift_diffusion as steps

    w = {k: str(world / k) for k in ("data", "base", "net")}
    tracking.configure()
    with mlflow.start_run():
        evaluations, dirs = [], []
        for addon in ("controlnet/edges", "lora/inverted", "lora/tint"):
            out = tmp_path / addon.replace("/", "-")
            m = steps.train_addon(base_dir=w["base"], dataset_dir=w["data"], out_dir=str(out), addon=addon, **TRAIN)
            assert m["final_loss"] > 0 if "final_loss" in m else m
            evaluations.append(steps.evaluate_addon(base_dir=w["base"], addon_dir=str(out), dataset_dir=w["data"],
                                                    feature_net_dir=w["net"], num_per_class=1, steps=2,
                                                    guidance_scale=2.0, seed=0))
            dirs.append(str(out))
        cn, lora, tint = evaluations
        assert 0 <= cn["controlnet_edges_edge_f1"] <= 1 and 0 <= cn["controlnet_edges_base_edge_f1"] <= 1
        assert cn["controlnet_edges_fd"] > 0 and cn["evaluator_version"] == 1.0
        assert lora["lora_inverted_style_fd_ratio"] == pytest.approx(
            lora["lora_inverted_style_fd"] / lora["lora_inverted_base_style_fd"])
        assert 0 < lora["lora_inverted_ssim_vs_base"] <= 1
        with pytest.raises(ValueError, match="trained twice"):
            steps.register_addons(addons=[dirs[1], dirs[1]], evaluations=[], model_name="sd", store_dir=str(tmp_path / "x"))

        store = tmp_path / "store"
        reg = steps.register_addons(addons=dirs, evaluations=[json.dumps(e) for e in evaluations], model_name="sd",
                                    store_dir=str(store))
        assert reg["addons_version"] == "1" and reg["lora_style_fd_ratio_max"] == max(
            lora["lora_inverted_style_fd_ratio"], tint["lora_tint_style_fd_ratio"])
        assert registry.storage_uri("sd-addons", "1") == reg["addons_uri"]
        assert (Path(reg["addons_uri"]) / "lora" / "inverted" / "pytorch_lora_weights.safetensors").exists()

        release = tmp_path / "release"
        carried = {k: v for k, v in reg.items() if isinstance(v, float)}
        served = steps.evaluate_serving(base_dir=w["base"], store_dir=str(store), addon_metrics=json.dumps(carried),
                                        dataset_dir=w["data"], feature_net_dir=w["net"], steps=5,
                                        guidance_scale=2.0, wait_fraction=0.4, trials=1, quality_seeds=2,
                                        num_per_class=1, seed=0, release_dir=str(release))
    assert served["late_patch_step"] == 1.0 and 0 < served["ssim_late_patch"] <= 1
    # Every registered LoRA is scored; the headline is the worst one's, the mean beside it.
    assert served["late_patch_loras"] == 2.0
    for f in (20, 40):  # K/N 0.1 and 0.2 are both step 1 of 5
        ssims = [served[f"lora_{n}_ssim_late_k{f}"] for n in ("inverted", "tint")]
        fds = [served[f"lora_{n}_fd_ratio_late_k{f}"] for n in ("inverted", "tint")]
        assert all(0 < x <= 1 for x in ssims) and all(x > 0 for x in fds)
        assert served[f"ssim_late_k{f}"] == min(ssims) and served[f"fd_ratio_late_k{f}"] == max(fds)
        assert served[f"ssim_late_k{f}_mean"] == pytest.approx(sum(ssims) / 2)
    assert served["ssim_late_k20"] == served["ssim_late_patch"] and served["fd_ratio_late_k20"] == served["fd_ratio_late_patch"]
    assert served["lora_inverted_fd_from_step_0"] > 0 and served["lora_tint_fd_from_step_0"] > 0
    assert served["evaluator_version"] == 1.0
    assert served["latency_ratio_cn_cold_lora"] == pytest.approx(
        served["latency_cn_cold_lora_s"] / served["baseline_latency_cn_cold_lora_s"])
    assert served["lora_style_fd_ratio_max"] == reg["lora_style_fd_ratio_max"]  # the gate sees the add-ons too
    # The release is what the predictor serves: the base with the registered store as its add-on source.
    cfg = json.loads((release / "distillery.json").read_text())
    assert cfg["kind"] == "swift-diffusion" and cfg["addons_uri"] == reg["addons_uri"]
    m = SwiftDiffusionModel("release", release)
    m.check()
    m._refresh_index()
    assert m._index == {("controlnet", "edges"), ("lora", "inverted"), ("lora", "tint")}
