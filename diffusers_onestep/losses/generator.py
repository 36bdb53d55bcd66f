"""The one-step generator `x0 = G(z, c)` shared by every distillation loss and training script (METHODS.md section 1).

The student UNet is called once at its conditioning timestep `t_init` on `z` itself (SwiftBrush, `input_type="noise"`)
or on `s_{t_init} z` (SiD-LSG, `input_type="scaled_noise"`), and its output is converted to `x0` by the same adapter
as every other network (`Denoiser`). `t_init`, the input scaling, the noise schedule and the prediction type are read
from the student's scheduler config (`ConsistencyStudentScheduler`), never hard-coded.
"""

from __future__ import annotations

import torch

from ..models.denoiser import INPUT_TYPES, Denoiser
from ..models.denoiser import student_input as _student_input


__all__ = ["INPUT_TYPES", "noise_and_timesteps", "student_generate", "student_input"]


def student_input(scheduler, noise: torch.Tensor) -> torch.Tensor:
    r"""
    The student's network input `x_{t_init}` for `noise` (`(batch, C, H, W)`): `z` (`input_type="noise"`) or
    `s_{t_init} z` (`input_type="scaled_noise"`), per `scheduler.config` (`models.denoiser.student_input`).
    """
    return _student_input(
        scheduler.alphas_cumprod, scheduler.config.t_init, noise, scheduler.config.get("input_type", "noise")
    )


def student_generate(
    unet,
    scheduler,
    noise: torch.Tensor,
    prompt_embeds: torch.Tensor | dict,
    cross_attention_kwargs: dict | None = None,
    backbone=None,
) -> torch.Tensor:
    r"""
    One student step: `x0 = G(z, c)`, differentiable with respect to the student's parameters.

    Args:
        unet (`UNet2DConditionModel`, `PixArtTransformer2DModel`, or a callable view of one with a `dtype`, such as
            `training_utils.AdapterView`): the student.
        scheduler (`ConsistencyStudentScheduler` or any scheduler whose config has `t_init`, `input_type`,
            `prediction_type` and which exposes `alphas_cumprod`): the student's scheduler.
        noise (`torch.Tensor`): `z`, shape `(batch, C, H, W)`.
        prompt_embeds (`dict` or `torch.Tensor`): the conditioning dict of the backbone (`models.backbones`), or SD's
            text embeddings `(batch, seq_len, dim)`.
        cross_attention_kwargs (`dict`, *optional*): passed to the network.
        backbone (`BackboneAdapter`, *optional*): the network call; defaults to the adapter of `unet` (or of its
            `base`).

    Returns:
        `torch.Tensor`: `x0` in float32, shape of `noise`.
    """
    if "t_init" not in scheduler.config:
        raise ValueError(
            f"The student scheduler ({type(scheduler).__name__}) has no `t_init` in its config: use "
            "`ConsistencyStudentScheduler.from_config(teacher_scheduler.config, t_init=..., input_type=...)`."
        )
    denoiser = Denoiser(unet, scheduler.alphas_cumprod, scheduler.config.prediction_type, backbone=backbone)
    sample = student_input(scheduler, noise)
    return denoiser(sample, scheduler.config.t_init, prompt_embeds, cross_attention_kwargs=cross_attention_kwargs).x0


def noise_and_timesteps(x0, noise, timesteps, low: int, high: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The given `noise` / `timesteps`, or draws from `generator`: `eps ~ N(0, I)`, `t ~ U{low..high}` (inclusive)."""
    device = generator.device if generator is not None else "cpu"
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=device)
    if timesteps is None:
        timesteps = torch.randint(low, high + 1, (x0.shape[0],), generator=generator, device=device)
    return noise.to(x0.device).float(), timesteps.to(x0.device).long()
