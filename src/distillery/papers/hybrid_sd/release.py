"""The released hybrid: `cloud/` (the large model's StableDiffusionPipeline), `edge/` (pruned UNet, tiny VAE and the
shared text encoder, tokenizer and scheduler) and `hybrid.json` (steps N, split k, order, guidance)."""

from __future__ import annotations

import json
from pathlib import Path

HYBRID_FILE = "hybrid.json"


def load_config(release_dir: Path) -> dict:
    path = Path(release_dir) / HYBRID_FILE
    if not path.exists():
        raise FileNotFoundError(f"{release_dir} is not a hybrid-sd release: no {HYBRID_FILE} (with cloud/ and edge/)")
    cfg = json.loads(path.read_text())
    missing = {"steps", "split", "guidance_scale"} - set(cfg)
    if missing:
        raise ValueError(f"{path} lacks {sorted(missing)}")
    if not 0 <= int(cfg["split"]) <= int(cfg["steps"]):
        raise ValueError(f"{path}: split must lie in [0, steps], got {cfg['split']} of {cfg['steps']}")
    return cfg


def load_cloud(release_dir: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(Path(release_dir) / "cloud", use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_edge(release_dir: Path):
    """The edge as an in-memory StableDiffusionPipeline (small UNet, tiny VAE): the sampler needs its prompt
    encoding and scheduler; nothing of the large model is loaded."""
    from diffusers import AutoencoderTiny, StableDiffusionPipeline
    from diffusers.schedulers import DPMSolverMultistepScheduler
    from transformers import AutoModel, AutoTokenizer

    from distillery.papers.hybrid_sd.pruning import load_unet

    edge = Path(release_dir) / "edge"
    encoder = AutoModel.from_pretrained(edge / "text_encoder", local_files_only=True).eval()  # its saved config
    pipe = StableDiffusionPipeline(vae=AutoencoderTiny.from_pretrained(edge / "vae").eval(), text_encoder=encoder,
                                   tokenizer=AutoTokenizer.from_pretrained(edge / "tokenizer", local_files_only=True),
                                   unet=load_unet(edge / "unet"),
                                   scheduler=DPMSolverMultistepScheduler.from_pretrained(edge / "scheduler"),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
