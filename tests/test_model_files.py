"""Saved model folders are readable by every uid (a predictor reading a volume another pod wrote)."""

import stat

import torch
from safetensors.torch import save_file

from distillery.models.files import share_readable


def test_atomic_safetensors_writes_are_opened_up_for_other_uids(tmp_path):
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, model / "unet" / "diffusion.safetensors")
    (model / "unet").chmod(0o700)
    share_readable(model)
    f = (model / "unet" / "diffusion.safetensors").stat().st_mode
    assert f & stat.S_IROTH and not f & stat.S_IWOTH
    assert (model / "unet").stat().st_mode & (stat.S_IROTH | stat.S_IXOTH) == stat.S_IROTH | stat.S_IXOTH
