"""SCott: stochastic consistency distillation of a text-to-image latent diffusion model (plain PyTorch)."""

from distillery.papers.scott.distillation import (
    METHODS,
    DistillConfig,
    LatentDiscriminator,
    consistency_fn,
    discriminator_hinge_loss,
    distill,
    generator_adversarial_loss,
    stochastic_ddim_step,
    student_pipeline,
    teacher_solve,
)

__all__ = ["METHODS", "DistillConfig", "LatentDiscriminator", "consistency_fn", "discriminator_hinge_loss", "distill",
           "generator_adversarial_loss", "stochastic_ddim_step", "student_pipeline", "teacher_solve"]
