"""SCott: stochastic consistency distillation of a text-to-image latent diffusion model (plain PyTorch)."""

from distillery.papers.scott.discriminator import (
    DISCRIMINATORS,
    LatentDiscriminator,
    TeacherFeatureDiscriminator,
    adversarial_losses,
    discriminator_hinge_loss,
    generator_adversarial_loss,
    make_discriminator,
)
from distillery.papers.scott.distillation import (
    METHODS,
    DistillConfig,
    consistency_fn,
    distill,
    stochastic_ddim_step,
    student_pipeline,
    teacher_solve,
)

__all__ = ["DISCRIMINATORS", "METHODS", "DistillConfig", "LatentDiscriminator", "TeacherFeatureDiscriminator",
           "adversarial_losses", "consistency_fn", "discriminator_hinge_loss", "distill", "generator_adversarial_loss",
           "make_discriminator", "stochastic_ddim_step", "student_pipeline", "teacher_solve"]
