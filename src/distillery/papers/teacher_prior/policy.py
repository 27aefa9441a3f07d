"""A saved locomotion policy: `model.safetensors` (normalizer + actor-critic [+ aux head] weights) + `policy.json`
(kind "locomotion", role teacher / student variant, the TerrainConfig, network size, learning curves). A student
folder also holds `policy.onnx`: observation history (B, H, 21) -> action (B, 6), what runs on a robot, checked
equal to PyTorch under ONNX Runtime when it is written. Acts deterministically (the Gaussian's mean, clipped)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distillery.models.files import share_readable
from distillery.papers.teacher_prior.env import ACT, AUX, FRAME, TerrainConfig
from distillery.papers.teacher_prior.model import LocoPolicy

ONNX_FILE = "policy.onnx"
ONNX_TOLERANCE = 1e-5


class _Deployed(nn.Module):
    """The deployed student: history (B, H, FRAME) -> clipped mean action. No encoder, no privileged input."""

    def __init__(self, net: LocoPolicy, history: int):
        super().__init__()
        self.net, self.history = net, history

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        return self.net.mean_action(history.reshape(history.shape[0], self.history * FRAME)).clamp(-1, 1)


def export_onnx(net: LocoPolicy, cfg: TerrainConfig, path: Path) -> float:
    """Write the student's ONNX graph and return the largest |ONNX Runtime - PyTorch| over random histories."""
    import onnxruntime as ort

    deployed = _Deployed(net.eval(), cfg.history).eval()
    x = torch.randn(4, cfg.history, FRAME)
    # The TorchScript-based exporter (as hybrid-sd's): the dynamo one needs onnxscript.
    torch.onnx.export(deployed, (x,), str(path), input_names=["observations"], output_names=["actions"],
                      dynamic_axes={"observations": {0: "batch"}, "actions": {0: "batch"}}, dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probe = torch.randn(32, cfg.history, FRAME) * 2
    with torch.no_grad():
        want = deployed(probe).numpy()
    got = session.run(["actions"], {"observations": probe.numpy()})[0]
    return float(np.abs(got - want).max())


def save_policy(out: Path, net: LocoPolicy, cfg: TerrainConfig, *, role: str, curve: list, disc_curve: list,
                **meta) -> dict:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, out / "model.safetensors")
    info = {"kind": "locomotion", "role": role, "terrain_config": cfg.as_dict(), "obs_dim": net.obs_dim,
            "hidden": net.hidden, "aux_dim": net.aux_dim, "curve": curve, "disc_curve": disc_curve, **meta}
    if role != "teacher":
        diff = export_onnx(net, cfg, out / ONNX_FILE)
        if not diff <= ONNX_TOLERANCE:
            raise RuntimeError(f"the ONNX export differs from PyTorch by {diff:.2e} > {ONNX_TOLERANCE:g}")
        info["onnx_max_abs_diff"] = diff
    (out / "policy.json").write_text(json.dumps(info))
    share_readable(out)
    return info


class SavedPolicy:
    def __init__(self, path: Path):
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / "policy.json").exists():
            raise FileNotFoundError(f"{path} is not a saved locomotion policy (policy.json missing)")
        meta = json.loads((path / "policy.json").read_text())
        if meta.get("kind") != "locomotion":
            raise ValueError(f"{path} holds a {meta.get('kind')!r} policy, not a locomotion policy")
        self.meta, self.role = meta, meta["role"]
        self.cfg = TerrainConfig.from_dict(meta["terrain_config"])
        self.net = LocoPolicy(meta["obs_dim"], ACT, meta["hidden"], aux_dim=meta["aux_dim"])
        self.net.load_state_dict(load_file(path / "model.safetensors"))
        self.net.eval()
        self.obs_key = "teacher" if self.role == "teacher" else "student"

    @property
    def has_aux(self) -> bool:
        return self.net.aux_dim == AUX

    @torch.no_grad()
    def act(self, obs: np.ndarray) -> np.ndarray:
        """Flat observations (B, obs_dim) as TerrainVecEnv builds them -> actions in [-1, 1]^6."""
        return self.net.act_deterministic(torch.as_tensor(np.asarray(obs), dtype=torch.float32)).numpy()

    @torch.no_grad()
    def act_history(self, history: np.ndarray) -> np.ndarray:
        """A student's observation history (B, H, 21), oldest frame first -> actions (B, 6)."""
        h = np.asarray(history, np.float32)
        return self.act(h.reshape(h.shape[0], -1))

    @torch.no_grad()
    def predict_aux(self, obs: np.ndarray) -> np.ndarray:
        """The auxiliary head's privileged estimates in their own units (vx, vz, height, contacts, scales)."""
        z = self.net.predict_aux(torch.as_tensor(np.asarray(obs), dtype=torch.float32)).numpy()
        return z * np.asarray(self.meta["aux_std"]) + np.asarray(self.meta["aux_mean"])


def load_policy(path: Path, role: str | None = None) -> SavedPolicy:
    p = SavedPolicy(path)
    if role is not None and p.role != role:
        raise ValueError(f"{path} holds the {p.role!r} policy, expected the {role!r} one")
    return p
