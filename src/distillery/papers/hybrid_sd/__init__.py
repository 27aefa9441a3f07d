"""Hybrid SD: edge-cloud collaborative text-to-image diffusion (plain PyTorch / diffusers)."""
