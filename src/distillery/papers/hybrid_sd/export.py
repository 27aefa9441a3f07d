"""The edge model in ONNX: the pruned UNet (one guided step's evaluation) and the tiny VAE's decoder, the two
networks an edge device runs, checked against PyTorch under ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn


class _UNetStep(nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class _Decoder(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]


def example_inputs(pipe, batch: int = 2, tokens: int | None = None) -> dict:
    c = pipe.unet.config
    tokens = tokens or pipe.tokenizer.model_max_length
    gen = torch.Generator().manual_seed(0)
    return {"sample": torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, generator=gen),
            "timestep": torch.tensor(500, dtype=torch.int64),
            "encoder_hidden_states": torch.randn(batch, tokens, c.cross_attention_dim, generator=gen)}


@torch.no_grad()
def export_edge(pipe, out_dir: Path) -> dict[str, Path]:
    """unet.onnx (batch dynamic) and vae_decoder.onnx, with opset 17 (GroupNorm, scaled dot-product attention)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    x = example_inputs(pipe)
    paths = {"unet": out_dir / "unet.onnx", "vae_decoder": out_dir / "vae_decoder.onnx"}
    # The TorchScript-based exporter: the dynamo exporter needs onnxscript, which the edge path does not otherwise use.
    torch.onnx.export(_UNetStep(pipe.unet.eval()), (x["sample"], x["timestep"], x["encoder_hidden_states"]),
                      str(paths["unet"]), input_names=list(x), output_names=["noise_pred"], opset_version=17,
                      dynamic_axes={"sample": {0: "batch"}, "encoder_hidden_states": {0: "batch"},
                                    "noise_pred": {0: "batch"}}, dynamo=False)
    torch.onnx.export(_Decoder(pipe.vae.eval()), (x["sample"],), str(paths["vae_decoder"]), input_names=["latents"],
                      output_names=["image"], opset_version=17,
                      dynamic_axes={"latents": {0: "batch"}, "image": {0: "batch"}}, dynamo=False)
    return paths


@torch.no_grad()
def compare_onnx(pipe, paths: dict[str, Path], batch: int = 3) -> dict:
    """Largest absolute difference between ONNX Runtime and PyTorch on fresh inputs (another batch size than the
    export's, so the dynamic axis is exercised)."""
    import onnxruntime as ort

    x = example_inputs(pipe, batch=batch)
    unet = ort.InferenceSession(str(paths["unet"]), providers=["CPUExecutionProvider"])
    got = unet.run(None, {k: v.numpy() for k, v in x.items()})[0]
    want = _UNetStep(pipe.unet.eval())(x["sample"], x["timestep"], x["encoder_hidden_states"]).numpy()
    dec = ort.InferenceSession(str(paths["vae_decoder"]), providers=["CPUExecutionProvider"])
    img = dec.run(None, {"latents": x["sample"].numpy()})[0]
    img_want = _Decoder(pipe.vae.eval())(x["sample"]).numpy()
    return {"unet_max_abs_diff": float(np.abs(got - want).max()), "unet_scale": float(np.abs(want).max()),
            "decoder_max_abs_diff": float(np.abs(img - img_want).max())}
