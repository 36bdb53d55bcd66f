"""Validation images: generated with a fixed generator, saved as a PNG grid and logged to the trackers."""

from __future__ import annotations

import os

import numpy as np
import PIL.Image
import torch
from accelerate import Accelerator
from diffusers.utils import make_image_grid


__all__ = ["log_validation"]


@torch.no_grad()
def log_validation(
    pipeline,
    *,
    prompts: list[str],
    accelerator: Accelerator,
    step: int,
    output_dir: str,
    seed: int | None = None,
    num_images_per_prompt: int = 2,
    tag: str = "validation",
    **call_kwargs,
) -> tuple[list[PIL.Image.Image], str]:
    r"""
    Renders `num_images_per_prompt` images per prompt with `pipeline` (one step) from a generator seeded by `seed`,
    saves the grid (one row per prompt) to `output_dir/validation/step-{step}.png` and logs the images to every
    tracker (TensorBoard images, W&B `Image`s with captions). Call on the main process. Works for every student
    pipeline (`OneStepPipeline`, `OneStepXLPipeline`, `OneStepPixArtPipeline`): each encodes the prompts with its
    backbone's own `encode_prompt`; `call_kwargs` (e.g. `TeacherComponents.generation_kwargs`: the trained size,
    PixArt's `use_resolution_binning=False`) go to the pipeline call.

    Returns:
        `(images, grid_path)`.
    """
    generator = torch.Generator().manual_seed(seed or 0)
    images = []
    for prompt in prompts:
        images += pipeline(
            prompt, num_images_per_prompt=num_images_per_prompt, generator=generator, output_type="pil", **call_kwargs
        ).images
    grid = make_image_grid(images, rows=len(prompts), cols=num_images_per_prompt)
    path = os.path.join(output_dir, "validation", f"step-{step:06d}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    grid.save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            # grayscale students (one-channel VAEs) give (H, W) arrays: NHWC needs the channel axis
            stacked = np.stack([np.asarray(image.convert("RGB")) for image in images])
            tracker.writer.add_images(tag, stacked, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            captions = [p for p in prompts for _ in range(num_images_per_prompt)]
            tracker.log({tag: [wandb.Image(im, caption=c) for im, c in zip(images, captions)]}, step=step)
    return images, path
