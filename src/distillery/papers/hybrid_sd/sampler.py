"""The hybrid sampler: one scheduler trajectory of N steps, the first k by one UNet and the remaining N-k by another.

Only the UNet changes at the switch; text embeddings, scheduler and its state (step index and, for multistep
solvers such as DPM-Solver++, the history of model outputs) carry across it, so `k = N` is exactly the first model
alone and `k = 0` the second. The loop is the one of diffusers' `StableDiffusionPipeline` (same noise, same
classifier-free guidance, same scheduler calls), split at step k; `SchedulerState` is what the cloud hands the edge
besides the latents.

Order "large-small" is Hybrid SD's (the large model plans the layout, the small one adds detail); "small-large" is
the reverse that T-Stitch argues for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ORDERS = ("large-small", "small-large")


@torch.no_grad()
def prompt_embeddings(pipe, prompts: list[str], guidance_scale: float) -> torch.Tensor:
    """[uncond; cond] embeddings when guidance is on, else cond (what the UNet sees every step)."""
    cond, uncond = pipe.encode_prompt(prompts, torch.device("cpu"), 1, guidance_scale > 1.0)
    return torch.cat([uncond, cond]) if guidance_scale > 1.0 else cond


def initial_latents(pipe, seeds: list[int], size: int | None = None) -> torch.Tensor:
    """The pipeline's starting noise: one generator per seed, scaled by the scheduler's init_noise_sigma."""
    from diffusers.utils.torch_utils import randn_tensor

    size = size or pipe.unet.config.sample_size
    shape = (len(seeds), pipe.unet.config.in_channels, size, size)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    return randn_tensor(shape, generator=gens, dtype=torch.float32) * pipe.scheduler.init_noise_sigma


@dataclass
class SchedulerState:
    """Where a trajectory stands: the next step's index and, for a multistep solver, the model outputs of the last
    steps it still needs (newest last; fewer than its order right after the start) and its lower-order count."""

    step_index: int
    lower_order_nums: int = 0
    model_outputs: torch.Tensor | None = None  # (filled, B, C, H, W)

    @classmethod
    def capture(cls, scheduler, step: int) -> "SchedulerState":
        outputs = [o for o in getattr(scheduler, "model_outputs", None) or [] if o is not None]
        return cls(step, int(getattr(scheduler, "lower_order_nums", 0)), torch.stack(outputs) if outputs else None)

    def check(self, scheduler, steps: int, latents: torch.Tensor) -> None:
        """Refuse a state this scheduler cannot continue from (a clear message, before any UNet runs)."""
        if not 0 <= self.step_index <= steps:
            raise ValueError(f"step_index must lie in [0, {steps}], got {self.step_index}")
        if not torch.isfinite(latents).all():
            raise ValueError("latents contain NaN or infinite values")
        slots = len(getattr(scheduler, "model_outputs", []) or [])
        filled = 0 if self.model_outputs is None else self.model_outputs.shape[0]
        if filled > slots:
            raise ValueError(f"{type(scheduler).__name__} keeps {slots} model outputs, the state carries {filled}")
        if slots and self.step_index > 0 and filled != min(self.step_index, slots):
            raise ValueError(f"after {self.step_index} steps the solver holds {min(self.step_index, slots)} model "
                             f"outputs, the state carries {filled}")
        if filled:
            if tuple(self.model_outputs.shape[1:]) != tuple(latents.shape):
                raise ValueError(f"model_outputs must be (n, {', '.join(map(str, latents.shape))}) like the latents, "
                                 f"got {tuple(self.model_outputs.shape)}")
            if not torch.isfinite(self.model_outputs).all():
                raise ValueError("model_outputs contain NaN or infinite values")
        if not 0 <= self.lower_order_nums <= max(slots, 0):
            raise ValueError(f"lower_order_nums must lie in [0, {slots}], got {self.lower_order_nums}")

    def restore(self, scheduler) -> None:
        if self.step_index == 0:
            return  # a fresh trajectory: set_timesteps already reset the scheduler
        if hasattr(scheduler, "model_outputs"):
            slots = len(scheduler.model_outputs)
            filled = [] if self.model_outputs is None else [o.clone() for o in self.model_outputs]
            scheduler.model_outputs = [None] * (slots - len(filled)) + filled
            scheduler.lower_order_nums = self.lower_order_nums
        scheduler._step_index = self.step_index


@torch.no_grad()
def denoise(unet, scheduler, latents: torch.Tensor, embeddings: torch.Tensor, guidance_scale: float, start: int,
            stop: int) -> torch.Tensor:
    """Steps [start, stop) of the scheduler's trajectory with `unet` (scheduler already at `start`)."""
    for t in scheduler.timesteps[start:stop]:
        x = torch.cat([latents] * 2) if guidance_scale > 1.0 else latents
        x = scheduler.scale_model_input(x, t)
        eps = unet(x, t, encoder_hidden_states=embeddings, return_dict=False)[0]
        if guidance_scale > 1.0:
            uncond, cond = eps.chunk(2)
            eps = uncond + guidance_scale * (cond - uncond)
        latents = scheduler.step(eps, t, latents, return_dict=False)[0]
    return latents


def fresh_scheduler(pipe, steps: int):
    scheduler = pipe.scheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    return scheduler


def check_split(steps: int, k: int) -> None:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0 <= k <= steps:
        raise ValueError(f"the split k must lie in [0, {steps}], got {k}")


@torch.no_grad()
def run_first(pipe, unet, prompts: list[str], seeds: list[int], *, steps: int, k: int, guidance_scale: float,
              ) -> tuple[torch.Tensor, SchedulerState]:
    """The first k steps (the cloud's part): latents after step k and the scheduler state to continue from."""
    check_split(steps, k)
    scheduler = fresh_scheduler(pipe, steps)
    latents = initial_latents(pipe, seeds)
    latents = denoise(unet, scheduler, latents, prompt_embeddings(pipe, prompts, guidance_scale), guidance_scale, 0, k)
    return latents, SchedulerState.capture(scheduler, k)


@torch.no_grad()
def run_rest(pipe, unet, prompts: list[str], latents: torch.Tensor, state: SchedulerState, *, steps: int,
             guidance_scale: float) -> torch.Tensor:
    """Steps k..N from the latents and scheduler state another process handed over (the edge's part)."""
    scheduler = fresh_scheduler(pipe, steps)
    state.check(scheduler, steps, latents)
    state.restore(scheduler)
    embeddings = prompt_embeddings(pipe, prompts, guidance_scale)
    return denoise(unet, scheduler, latents, embeddings, guidance_scale, state.step_index, steps)


@torch.no_grad()
def hybrid_latents(pipe, first_unet, second_unet, prompts: list[str], seeds: list[int], *, steps: int, k: int,
                   guidance_scale: float) -> torch.Tensor:
    """N steps: k with `first_unet`, N-k with `second_unet`, one scheduler trajectory."""
    latents, state = run_first(pipe, first_unet, prompts, seeds, steps=steps, k=k, guidance_scale=guidance_scale)
    return run_rest(pipe, second_unet, prompts, latents, state, steps=steps, guidance_scale=guidance_scale)


@torch.no_grad()
def generate_latents(pipe, unet, prompts: list[str], seeds: list[int], *, steps: int,
                     guidance_scale: float) -> torch.Tensor:
    return hybrid_latents(pipe, unet, unet, prompts, seeds, steps=steps, k=steps, guidance_scale=guidance_scale)


@torch.no_grad()
def decode(vae, latents: torch.Tensor):
    """uint8 (N, H, W, 3) images from diffusion latents with an AutoencoderKL or AutoencoderTiny."""
    import numpy as np

    x = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy().astype(np.uint8)
