"""Tiny SD: a real StableDiffusionPipeline, resumable training, classifier-free guidance."""

from __future__ import annotations

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
        "assert not [m for m in sys.modules if m.startswith('distillery')]\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pkl"))


def test_classifier_free_guidance_changes_the_image():
    pipe = tiny_sd.build_pipeline(CFG)
    run = lambda g: pipe(["a dark square"], num_inference_steps=3, guidance_scale=g, height=16, width=16,  # noqa: E731
                         generator=torch.Generator().manual_seed(0), output_type="np").images
    assert not np.allclose(run(1.0), run(5.0))
    np.testing.assert_allclose(run(5.0), run(5.0))


def test_interrupted_unet_training_resumes_to_the_same_weights(vae_dir, tmp_path):
    ds = Synthetic()
    kw = dict(cfg=CFG, steps=12, batch_size=4, seed=0, checkpoint_every=4)
    full = tiny_sd.train_unet(ds, vae_dir, tmp_path / "full", checkpoint_dir=tmp_path / "ck_full", **kw)
    assert full["resumed_from_step"] == 0

    class Interrupt(Exception):
        pass

    def stop_at_ten(_, step):
        if step >= 10:
            raise Interrupt

    with pytest.raises(Interrupt):
        tiny_sd.train_unet(ds, vae_dir, tmp_path / "resumed", checkpoint_dir=tmp_path / "ck", on_log=stop_at_ten,
                           log_every=2, **kw)
    assert not (tmp_path / "resumed" / "model_index.json").exists()
    again = tiny_sd.train_unet(ds, vae_dir, tmp_path / "resumed", checkpoint_dir=tmp_path / "ck", **kw)
    assert again["resumed_from_step"] == 8  # the last checkpoint before the interruption
    a = load_file(tmp_path / "full" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "resumed" / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)


@pytest.mark.slow
def test_training_reduces_the_loss(vae_dir, tmp_path):
    logs = []
    tiny_sd.train_unet(Synthetic(), vae_dir, tmp_path / "m", cfg=CFG, steps=150, batch_size=16, seed=0,
                       on_log=lambda m, s: logs.append(m["unet_loss"]), log_every=25)
    assert logs[-1] < logs[0]
