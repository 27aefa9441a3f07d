"""SwiftDiffusion add-ons on an untrained tiny SD (seconds): edge maps, LoRA styles, LoRA and ControlNet training
and their files as diffusers reads them."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from distillery.models import tiny_sd
from distillery.papers.swift_diffusion import addons, train

CFG = tiny_sd.TinySDConfig(resolution=16, vae_channels=(8, 16, 16), vae_norm_groups=4, unet_channels=(16, 32),
                           norm_groups=8)

pytestmark = pytest.mark.usefixtures("one_thread")


def _squares() -> np.ndarray:
    images = np.concatenate([np.full((8, 16, 16, 3), 230, np.uint8), np.full((8, 16, 16, 3), 25, np.uint8)])
    images[:, 4:12, 4:12] = 120
    return images


@dataclass
class Squares:
    images: np.ndarray = field(default_factory=_squares)
    captions: list = field(default_factory=lambda: ["a bright square"] * 8 + ["a dark square"] * 8)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    tiny_sd.build_pipeline(CFG, seed=0).save_pretrained(out)
    return out


def test_edge_map_outlines_the_square_and_nothing_else():
    edges = addons.edge_map(_squares()[:1])[0, :, :, 0]
    assert edges.dtype == np.uint8 and set(np.unique(edges)) == {0, 255}
    ring = np.zeros((16, 16), bool)
    ring[3:13, 3:13] = True
    ring[5:11, 5:11] = False  # the Sobel kernel marks both sides of the square's border
    assert np.array_equal(edges == 255, ring)
    assert not addons.edge_map(np.full((1, 16, 16, 3), 77, np.uint8)).any()  # a flat image has no edges
    with pytest.raises(ValueError, match="uint8"):
        addons.edge_map(np.zeros((1, 16, 16), np.uint8))


def test_styles_are_visibly_different_transformations():
    images = _squares()
    styled = {s: addons.stylize(images, s).astype(float) for s in addons.STYLES}
    assert len(styled) >= 3
    for a in styled:
        assert styled[a].shape == images.shape and np.abs(styled[a] - images).mean() > 10, a
        for b in styled:
            if a < b:
                assert np.abs(styled[a] - styled[b]).mean() > 10, (a, b)
    assert np.array_equal(styled["inverted"], 255.0 - images)
    tint = styled["tint"]
    assert (tint[..., 0] >= tint[..., 1]).all() and (tint[..., 1] >= tint[..., 2]).all()  # red over green over blue
    with pytest.raises(ValueError, match="unknown LoRA style 'sepia'"):
        addons.stylize(images, "sepia")


def test_configs_report_every_problem_at_once():
    with pytest.raises(ValueError, match="steps must be >= 1.*lr must be in.*style must be one of.*rank must be"):
        train.LoRATrainConfig(steps=0, lr=2.0, style="sepia", rank=0).check()
    assert train.conditioning_channels(4) == (16, 32, 64)  # two halvings: 16 px image -> 4 px latents


def test_trained_lora_file_is_what_diffusers_fuses_and_what_we_patch(base_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    cfg = train.LoRATrainConfig(steps=4, batch_size=4, lr=1e-2, style="inverted", rank=2, alpha=4.0)
    metrics = train.train_lora(Squares(), base_dir, tmp_path / "lora", cfg)
    assert np.isfinite(metrics["lora_final_loss"]) and metrics["lora_parameters"] > 0
    path = tmp_path / "lora" / addons.LORA_FILE
    lora = addons.read_lora(path, "inverted")
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")  # safetensors: length, JSON header, tensor bytes
    assert lora.scaling == 2.0 and lora.nbytes == path.stat().st_size - header
    kinds = {type(m).__name__ for n, m in StableDiffusionPipeline.from_pretrained(base_dir).unet.named_modules()
             if n in lora.layers}
    assert kinds == {"Linear", "Conv2d"}

    pipe = StableDiffusionPipeline.from_pretrained(base_dir)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(tmp_path / "lora")
    pipe.fuse_lora(lora_scale=0.7)
    pipe.unload_lora_weights()  # keeps the fused weights
    fused = pipe.unet.state_dict()
    for module in lora.layers:
        w = before[f"{module}.weight"]
        torch.testing.assert_close(fused[f"{module}.weight"], w + 0.7 * lora.delta(module, w.shape),
                                   rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(fused[f"{m}.weight"], before[f"{m}.weight"]) for m in lora.layers)


def test_trained_controlnet_loads_and_steers_the_frozen_unet(base_dir, tmp_path):
    from diffusers import ControlNetModel, UNet2DConditionModel

    metrics = train.train_controlnet(Squares(), base_dir, tmp_path / "cn",
                                     train.ControlNetTrainConfig(steps=4, batch_size=4, lr=1e-2))
    assert np.isfinite(metrics["controlnet_final_loss"])
    assert sorted(p.name for p in (tmp_path / "cn").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    cn = ControlNetModel.from_pretrained(tmp_path / "cn", use_safetensors=True).eval()
    unet = UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet").eval()
    z, t, text = torch.randn(2, 4, 4, 4), torch.tensor([500, 500]), torch.randn(2, 8, 384)
    hint = torch.from_numpy(addons.edge_map(_squares()[:2])).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        down, mid = cn(z, t, encoder_hidden_states=text, controlnet_cond=hint, return_dict=False)
        plain = unet(z, t, encoder_hidden_states=text).sample
        steered = unet(z, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                       mid_block_additional_residual=mid).sample
    assert len(down) == 1 + 2 * len(unet.down_blocks) - 1  # conv_in + each block's layers and downsamplers
    assert (steered - plain).abs().max() > 1e-4  # the zero convolutions moved off zero


def test_training_refuses_a_dataset_of_the_wrong_size(base_dir, tmp_path):
    bad = Squares(images=np.zeros((4, 32, 32, 3), np.uint8), captions=["x"] * 4)
    with pytest.raises(ValueError, match=r"\(N, 16, 16, 3\)"):
        train.train_lora(bad, base_dir, tmp_path / "x", train.LoRATrainConfig(steps=1))
