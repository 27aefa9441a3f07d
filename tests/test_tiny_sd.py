"""Tiny SD: a real StableDiffusionPipeline, resumable training, classifier-free guidance."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from distillery.models import tiny_sd

CFG = tiny_sd.TinySDConfig(resolution=16, vae_channels=(8, 16, 16), vae_norm_groups=4, unet_channels=(16, 32),
                           norm_groups=8)


pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Synthetic:
    """Two classes a model can tell apart: bright squares and dark squares."""
    images: np.ndarray = field(default_factory=lambda: np.concatenate([
        np.full((16, 16, 16, 3), 230, np.uint8), np.full((16, 16, 16, 3), 25, np.uint8)]))
    captions: list = field(default_factory=lambda: ["a bright square"] * 16 + ["a dark square"] * 16)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    tiny_sd.train_vae(Synthetic(), out, cfg=CFG, steps=30, batch_size=8, seed=0)
    return out


def test_untrained_pipeline_saves_and_loads_without_distillery(tmp_path):
    pipe = tiny_sd.build_pipeline(CFG)
    pipe.save_pretrained(tmp_path)
    code = (
        "import sys, torch\nfrom diffusers import StableDiffusionPipeline\n"
        f"p = StableDiffusionPipeline.from_pretrained({str(tmp_path)!r})\n"
        "out = p(['a digit seven'], num_inference_steps=2, guidance_scale=3.0, height=16, width=16,\n"
        "        generator=torch.Generator().manual_seed(0), output_type='np').images\n"
        "assert out.shape == (1, 16, 16, 3), out.shape\n"
        "assert type(p.text_encoder).__name__ == 'BertModel' and p.safety_checker is None\n"
        "assert p.text_encoder.config.use_attention_mask and p.tokenizer.model_max_length <= 32\n"
        "assert not [m for m in sys.modules if m.startswith('distillery')]\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see one_thread
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pkl"))


def test_classifier_free_guidance_changes_the_image():
    pipe = tiny_sd.build_pipeline(CFG)
    run = lambda g: pipe(["a dark square"], num_inference_steps=3, guidance_scale=g, height=16, width=16,  # noqa: E731
                         generator=torch.Generator().manual_seed(0), output_type="np").images
    assert not np.allclose(run(1.0), run(5.0))
    np.testing.assert_allclose(run(5.0), run(5.0))


class Interrupt(Exception):
    pass


def _stop_at(k):
    def on_log(_, step):
        if step >= k:
            raise Interrupt

    return on_log


def _assert_same_weights(a_file, b_file):
    a, b = load_file(a_file), load_file(b_file)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)


def test_interrupted_unet_training_resumes_to_the_same_weights(vae_dir, tmp_path):
    ds = Synthetic()
    kw = dict(cfg=CFG, steps=12, batch_size=4, seed=0, checkpoint_every=4)
    full = tiny_sd.train_unet(ds, vae_dir, tmp_path / "full", checkpoint_dir=tmp_path / "ck_full", **kw)
    assert full["resumed_from_step"] == 0

    with pytest.raises(Interrupt):
        tiny_sd.train_unet(ds, vae_dir, tmp_path / "resumed", checkpoint_dir=tmp_path / "ck", on_log=_stop_at(10),
                           log_every=2, **kw)
    assert not (tmp_path / "resumed" / "model_index.json").exists()
    again = tiny_sd.train_unet(ds, vae_dir, tmp_path / "resumed", checkpoint_dir=tmp_path / "ck", **kw)
    assert again["resumed_from_step"] == 8  # the last checkpoint before the interruption
    _assert_same_weights(tmp_path / "full" / "unet" / "diffusion_pytorch_model.safetensors",
                         tmp_path / "resumed" / "unet" / "diffusion_pytorch_model.safetensors")
    # The saved pipeline carries the fast sampler, built from the training noise schedule.
    sched = json.loads((tmp_path / "resumed" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "DPMSolverMultistepScheduler" and sched["beta_schedule"] == "scaled_linear"

    # Settings that differ from the checkpoint's are refused rather than silently mixed.
    with pytest.raises(ValueError, match="other settings"):
        tiny_sd.train_unet(ds, vae_dir, tmp_path / "other", checkpoint_dir=tmp_path / "ck", **{**kw, "seed": 1})
    # A finished run started again does no work and keeps its result.
    done = tiny_sd.train_unet(ds, vae_dir, tmp_path / "resumed", checkpoint_dir=tmp_path / "ck", **kw)
    assert done["resumed_from_step"] == 12 and np.isfinite(done["unet_final_loss"])


def test_interrupted_vae_training_resumes_to_the_same_weights(tmp_path):
    kw = dict(cfg=CFG, steps=9, batch_size=4, seed=3, checkpoint_every=3, log_every=1)
    tiny_sd.train_vae(Synthetic(), tmp_path / "full", checkpoint_dir=tmp_path / "ck_full", **kw)
    with pytest.raises(Interrupt):
        tiny_sd.train_vae(Synthetic(), tmp_path / "resumed", checkpoint_dir=tmp_path / "ck", on_log=_stop_at(5), **kw)
    again = tiny_sd.train_vae(Synthetic(), tmp_path / "resumed", checkpoint_dir=tmp_path / "ck", **kw)
    assert again["resumed_from_step"] == 3
    _assert_same_weights(tmp_path / "full" / "diffusion_pytorch_model.safetensors",
                         tmp_path / "resumed" / "diffusion_pytorch_model.safetensors")
    conf = json.loads((tmp_path / "resumed" / "config.json").read_text())
    assert conf["scaling_factor"] == pytest.approx(again["vae_scaling_factor"]) and conf["scaling_factor"] > 0


def test_bad_inputs_are_refused_with_a_clear_message(vae_dir, tmp_path):
    with pytest.raises(ValueError, match="resolution"):
        tiny_sd.train_vae(Synthetic(), tmp_path / "v", cfg=tiny_sd.TinySDConfig(resolution=32), steps=1)
    with pytest.raises(ValueError, match="uint8"):
        bad = Synthetic()
        bad.images = bad.images.astype(np.float32)
        tiny_sd.train_vae(bad, tmp_path / "v", cfg=CFG, steps=1)
    with pytest.raises(ValueError, match="one caption per image"):
        short = Synthetic()
        short.captions = short.captions[:-1]
        tiny_sd.train_unet(short, vae_dir, tmp_path / "u", cfg=CFG, steps=1)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        tiny_sd.train_unet(Synthetic(), vae_dir, tmp_path / "u", cfg=CFG, steps=0)
    with pytest.raises(ValueError, match="cond_dropout"):
        tiny_sd.train_unet(Synthetic(), vae_dir, tmp_path / "u", cfg=CFG, steps=1, cond_dropout=1.0)
    with pytest.raises(FileNotFoundError, match="no VAE"):
        tiny_sd.train_unet(Synthetic(), tmp_path / "missing", tmp_path / "u", cfg=CFG, steps=1)


@pytest.mark.slow
def test_tiny_model_learns_digits_end_to_end(tmp_path):
    """Real MNIST digits, a truly tiny model and a few hundred steps: the losses fall and the evaluation
    (Frechet distance, conditional accuracy, grid) runs on what came out."""
    from conftest import REPO
    from distillery.data import build_image_caption_dataset, load_image_caption_dataset
    from distillery.models import image_eval

    build_image_caption_dataset(tmp_path / "ds", sources=("mnist",), resolution=16, per_class=40,
                                data_dir=REPO / "data")
    ds = load_image_caption_dataset(tmp_path / "ds")
    train, holdout = ds.train(), ds.holdout()
    vae_logs, unet_logs = [], []
    vae = tiny_sd.train_vae(train, tmp_path / "vae", cfg=CFG, steps=100, batch_size=32, lr=2e-3, seed=0,
                            on_log=lambda m, s: vae_logs.append(m["vae_loss"]), log_every=25)
    unet = tiny_sd.train_unet(train, tmp_path / "vae", tmp_path / "model", cfg=CFG, steps=250, batch_size=32, lr=1e-3,
                              seed=0, on_log=lambda m, s: unet_logs.append(m["unet_loss"]), log_every=50)
    assert vae_logs[-1] < 0.7 * vae_logs[0] and unet_logs[-1] < 0.8 * unet_logs[0], (vae_logs, unet_logs)
    print(f"vae {vae['vae_steps_per_s']:.1f} steps/s, unet {unet['unet_steps_per_s']:.1f} steps/s")

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "model")
    net = image_eval.train_feature_net(train.images, train.labels, len(ds.classes), steps=100, seed=0)
    result = image_eval.evaluate_text_to_image(pipe, holdout, net, num_per_class=3, steps=8, guidance_scale=3.0)
    assert np.isfinite(result["fd"]) and result["fd"] > 0 and 0 <= result["cond_acc"] <= 1
    assert result["num_generated"] == 30 and result["unet_evals_per_image"] == 16
    # Reference point: pure noise images sit further from the real digits than the model's samples.
    noise = np.random.default_rng(0).integers(0, 256, (30, 16, 16, 3), dtype=np.uint8)
    assert result["fd"] < image_eval.frechet_distance(net.features(noise), net.features(holdout.images))
    print({k: v for k, v in result.items() if k != "grid"})
