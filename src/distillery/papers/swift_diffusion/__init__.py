"""SwiftDiffusion (published as Katz): serving Stable Diffusion with add-on modules (LoRAs, ControlNets) without
their loading and patching on the critical path. Plain PyTorch / diffusers / peft.

- `addons.py`: the add-ons themselves: deterministic edge maps (the ControlNet's condition), the LoRA styles
  (transformations of the training images) and the LoRA file format (diffusers' `pytorch_lora_weights.safetensors`,
  read back as per-layer (A, B) pairs for in-place patching).
- `train.py`: training a ControlNet (`ControlNetModel.from_unet`, UNet frozen) and UNet-only LoRAs (peft) on the
  base model, on Lightning Fabric like every loop of the project.
- `runtime.py`: the serving runtime, the paper's contribution: the add-on cache with background fetches, LoRA
  patching at a step boundary (W += scale * B A, exact restore), the ControlNet run concurrently with the UNet's
  down and mid blocks, and the plain-diffusers baseline.
"""
