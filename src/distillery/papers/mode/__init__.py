"""MoDE: mixture-of-denoising-experts diffusion policy with noise-conditioned routing and expert caching."""

from distillery.papers.mode.model import (
    ExpertCache,
    MoDEConfig,
    MoDEPolicy,
    NoiseRoutedMoE,
    edm_loss,
    freeze_sampler,
    karras_sigmas,
    sample,
)

__all__ = ["ExpertCache", "MoDEConfig", "MoDEPolicy", "NoiseRoutedMoE", "edm_loss", "freeze_sampler", "karras_sigmas", "sample"]
