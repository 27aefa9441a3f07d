"""Lightning checkpoints on the Ceph RADOS Gateway: a VAE training interrupted with its checkpoint on s3:// resumes
from there (as a step restarted in a new pod would) and ends with the weights of an uninterrupted run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def test_vae_checkpoint_on_s3_resumes_to_the_uninterrupted_weights(s3_env, s3, tmp_path, monkeypatch):
    from test_tiny_sd import CFG, Interrupt, Synthetic, _assert_same_weights, _stop_at

    from distillery.models import tiny_sd
    from distillery.settings import get_settings
    from distillery.steps import checkpoint_dir

    monkeypatch.setenv("DISTILLERY_CHECKPOINT_ROOT", f"s3://{s3.bucket}/checkpoints")
    get_settings.cache_clear()
    ckpt = checkpoint_dir("train-vae", case="s3-resume")
    assert isinstance(ckpt, str) and ckpt.startswith(f"s3://{s3.bucket}/checkpoints/train-vae-")
    kw = dict(cfg=CFG, steps=6, batch_size=4, seed=3, checkpoint_every=2, log_every=1)
    tiny_sd.train_vae(Synthetic(), tmp_path / "full", checkpoint_dir=tmp_path / "ck_full", **kw)
    with pytest.raises(Interrupt):
        tiny_sd.train_vae(Synthetic(), tmp_path / "resumed", checkpoint_dir=ckpt, on_log=_stop_at(3), **kw)
    key = ckpt.removeprefix(f"s3://{s3.bucket}/") + "/last.ckpt"
    assert s3.keys(key) == [key]
    again = tiny_sd.train_vae(Synthetic(), tmp_path / "resumed", checkpoint_dir=ckpt, **kw)
    assert again["resumed_from_step"] == 2
    _assert_same_weights(tmp_path / "full" / "diffusion_pytorch_model.safetensors",
                         tmp_path / "resumed" / "diffusion_pytorch_model.safetensors")
