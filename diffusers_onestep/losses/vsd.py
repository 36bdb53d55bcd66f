"""Proper-Guidance SwiftBrush (PG-SB): variational score distillation with a random guidance scale.

Papers (equation numbers could not be checked offline; the steps below follow METHODS.md section 2):
    - SNOOPI: Supercharged One-step Diffusion Distillation with Proper Guidance, Nguyen et al., arXiv 2412.02687,
      "Proper Guidance - SwiftBrush": the teacher's guidance scale is drawn per sample from `U(k_min, k_max)` and the
      **same** scale is applied to the fake score.
    - SwiftBrush: One-Step Text-to-Image Diffusion Model with Variational Score Distillation, Nguyen & Tran,
      CVPR 2024: the student gradient and the LoRA fake-score loss; one fixed guidance scale is the baseline
      (`fixed_guidance_scale`). `guide_fake_score=False` gives the ProlificDreamer convention (guided teacher,
      conditional fake score).
    - ProlificDreamer (Wang et al., NeurIPS 2023): the VSD gradient `w(t) (eps_teacher - eps_fake) dx0/dtheta`.

Student (METHODS.md 2.1-2.3): `x_t = a_t x0 + s_t eps`, `t ~ U{t_min..t_max}`; without gradient
`e_teacher = e_psi(k)`, `e_fake = e_pi(k)`, `k ~ U(k_min, k_max)`; `w(t) = s_t^2`; the gradient on `x0` is
`w(t) (e_teacher - e_fake)`, implemented as `0.5 * mse(x0, stopgrad(x0 - w(t) (e_teacher - e_fake)))`.
Fake score (2.4): `mse(a_t e_pi(x_t, c'), a_t eps)` on `stopgrad(x0)` at `t ~ U{0..T-1}`, `c'` the empty prompt with
probability 0.1. Optional clamped CLIP loss (2.5, from SwiftBrush v2): `max(0, tau - cos(img, txt))`, tau 0.37, weight
0.1 decayed to 0 by the script (*unverified* defaults, exposed as flags).
NASA-T (SNOOPI v3, METHODS.md section 3): `negative_prompt_embeds` replaces the **teacher's** unconditional branch by
the drawn negative prompts, `e_teacher = (1 - k) e_psi(x_t, c_neg) + k e_psi(x_t, c)`; the fake score keeps the empty
prompt (the student's NASA forward is the script's, `training_utils.student_nasa`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..models.backbones import as_conditioning, expand_conditioning, where_conditioning
from ..models.denoiser import Denoiser, alpha_sigma
from .generator import noise_and_timesteps


__all__ = ["PGSwiftBrushLoss", "clamped_clip_loss"]


class PGSwiftBrushLoss:
    r"""
    The two players of PG-SB: `generator_loss` for the student, `fake_score_loss` for the LoRA fake score.

    Networks are passed at call time as `Denoiser`s (any prediction type, any backbone); the prompt conditioning is a
    conditioning dict (`models.backbones`: SD, SDXL, PixArt) or SD's `encoder_hidden_states` tensor. Randomness is
    drawn from `generator` unless given explicitly (`noise`, `timesteps`, `guidance_scale`, `uncond_mask`).

    Args:
        guidance_scale_range (`tuple[float, float]`, defaults to `(0.5, 4.0)`): `(k_min, k_max)` of the per-sample
            guidance scale (SNOOPI: SD1.5 / SD2.1 `U(0.5, 4)`, PixArt `U(0.5, 3)`).
        fixed_guidance_scale (`float`, *optional*): the SwiftBrush baseline: one fixed `k` instead of a random one.
        guide_fake_score (`bool`, defaults to `True`): apply the same `k` to the fake score (PG-SB). `False` gives the
            original SwiftBrush (guided teacher, conditional fake score).
        min_timestep, max_timestep (`int`, defaults to 20 and 980): the range of `t` for the student loss.
        uncond_prob (`float`, defaults to 0.1): probability of the empty prompt in the fake-score loss.
    """

    def __init__(
        self,
        *,
        guidance_scale_range: tuple[float, float] = (0.5, 4.0),
        fixed_guidance_scale: float | None = None,
        guide_fake_score: bool = True,
        min_timestep: int = 20,
        max_timestep: int = 980,
        uncond_prob: float = 0.1,
    ):
        k_min, k_max = guidance_scale_range
        if not (math.isfinite(k_min) and math.isfinite(k_max) and 0 <= k_min <= k_max):
            raise ValueError(
                f"`guidance_scale_range` must satisfy 0 <= k_min <= k_max (finite), got {guidance_scale_range}."
            )
        if fixed_guidance_scale is not None and not (math.isfinite(fixed_guidance_scale) and fixed_guidance_scale >= 0):
            raise ValueError(f"`fixed_guidance_scale` must be a finite number >= 0, got {fixed_guidance_scale}.")
        if not 0 <= min_timestep <= max_timestep:
            raise ValueError(f"need 0 <= `min_timestep` <= `max_timestep`, got {min_timestep} and {max_timestep}.")
        if not 0.0 <= uncond_prob <= 1.0:
            raise ValueError(f"`uncond_prob` must be in [0, 1], got {uncond_prob}.")
        self.guidance_scale_range = (float(k_min), float(k_max))
        self.fixed_guidance_scale = fixed_guidance_scale
        self.guide_fake_score = guide_fake_score
        self.min_timestep, self.max_timestep = min_timestep, max_timestep
        self.uncond_prob = uncond_prob

    def sample_guidance_scale(
        self, batch_size: int, *, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        r"""`k` per sample, shape `(batch_size,)`: `U(k_min, k_max)`, or the fixed scale of the baseline."""
        if self.fixed_guidance_scale is not None:
            return torch.full((batch_size,), float(self.fixed_guidance_scale), device=device)
        k_min, k_max = self.guidance_scale_range
        u = torch.rand(batch_size, generator=generator, device=generator.device if generator else "cpu")
        return (k_min + (k_max - k_min) * u).to(device)

    def generator_loss(
        self,
        teacher: Denoiser,
        fake_score: Denoiser,
        x0: torch.Tensor,
        prompt_embeds: torch.Tensor | dict,
        uncond_prompt_embeds: torch.Tensor | dict,
        *,
        noise: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        guidance_scale: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | dict | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        r"""
        The student's VSD loss (steps 1-3 of PG-SB). Only `x0` carries gradient; both scores run under `no_grad`.

        Args:
            teacher, fake_score (`Denoiser`): the frozen teacher `e_psi` and the fake score `e_pi`.
            x0 (`torch.Tensor`): the student's output `G(z, c)`, `(batch, C, H, W)`.
            prompt_embeds (`dict` or `torch.Tensor`): the prompt conditioning, `(batch, ...)` tensors (a tensor: SD's
                `(batch, seq_len, dim)` text embeddings).
            uncond_prompt_embeds (`dict` or `torch.Tensor`): the unconditional branch (the empty prompt), batch 1 or
                `batch`: the fake score's, and the teacher's unless `negative_prompt_embeds` is given.
            noise, timesteps, guidance_scale (`torch.Tensor`, *optional*): `eps`, `t` (`(batch,)` long) and `k`
                (`(batch,)`); drawn from `generator` when omitted.
            negative_prompt_embeds (`dict` or `torch.Tensor`, *optional*): NASA-T: the teacher's unconditional
                branch, the negative prompts' conditioning (batch 1 or `batch`).

        Returns:
            `(loss, logs)`: the batch-mean loss and detached values to log.
        """
        batch_size, num_train_timesteps = x0.shape[0], teacher.alphas_cumprod.shape[0]
        if self.max_timestep >= num_train_timesteps:
            raise ValueError(f"`max_timestep` must be < {num_train_timesteps}, got {self.max_timestep}.")
        noise, timesteps = noise_and_timesteps(x0, noise, timesteps, self.min_timestep, self.max_timestep, generator)
        if guidance_scale is None:
            guidance_scale = self.sample_guidance_scale(batch_size, device=x0.device, generator=generator)
        guidance_scale = guidance_scale.to(x0.device).float()
        cond = as_conditioning(prompt_embeds)
        uncond = expand_conditioning(as_conditioning(uncond_prompt_embeds), batch_size)
        teacher_uncond = uncond if negative_prompt_embeds is None else expand_conditioning(
            as_conditioning(negative_prompt_embeds), batch_size
        )  # fmt: skip

        # 1. diffuse the student's sample: x_t = a_t x0 + s_t eps
        alpha, sigma = alpha_sigma(teacher.alphas_cumprod.to(x0.device), timesteps, x0.ndim)
        x_t = alpha * x0.detach().float() + sigma * noise
        # 2. teacher and fake score with the same guidance scale k (PG-SB), without gradient; NASA-T: the teacher's
        # unconditional branch is the negative, the fake score's stays the empty prompt
        with torch.no_grad():
            eps_teacher = teacher(x_t, timesteps, cond, guidance_scale, teacher_uncond).eps
            if self.guide_fake_score:
                eps_fake = fake_score(x_t, timesteps, cond, guidance_scale, uncond).eps
            else:
                eps_fake = fake_score(x_t, timesteps, cond).eps
        # 3. gradient on x0 is w(t) (e_teacher - e_fake), w(t) = s_t^2; nan_to_num keeps one bad sample from
        # poisoning the batch (the loop's guard still catches a non-finite loss)
        grad = sigma**2 * (eps_teacher - eps_fake)
        target = torch.nan_to_num(x0.detach().float() - grad)
        loss = 0.5 * F.mse_loss(x0.float(), target, reduction="mean")
        logs = {
            "loss_vsd": loss.detach(),
            "grad_norm_x0": grad.flatten(1).norm(dim=1).mean().detach(),
            "guidance_scale": guidance_scale.mean().detach(),
        }
        return loss, logs

    def fake_score_loss(
        self,
        fake_score: Denoiser,
        x0: torch.Tensor,
        prompt_embeds: torch.Tensor | dict,
        uncond_prompt_embeds: torch.Tensor | dict,
        *,
        noise: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        uncond_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        r"""
        The fake score's denoising loss on the student's samples (step 4 of PG-SB): `mean(abar_t (e_pi - eps)^2)`.

        Args:
            fake_score (`Denoiser`): `e_pi`, trainable.
            x0 (`torch.Tensor`): the student's samples; detached here.
            prompt_embeds, uncond_prompt_embeds (`torch.Tensor`): as in `generator_loss`.
            noise, timesteps (`torch.Tensor`, *optional*): `eps` and `t ~ U{0..T-1}`.
            uncond_mask (`torch.Tensor`, *optional*): `(batch,)` bool, `True` where the empty prompt replaces the
                prompt; drawn with probability `uncond_prob` when omitted.

        Returns:
            `(loss, logs)`.
        """
        x0, batch_size = x0.detach().float(), x0.shape[0]
        last = fake_score.alphas_cumprod.shape[0] - 1
        noise, timesteps = noise_and_timesteps(x0, noise, timesteps, 0, last, generator)
        if uncond_mask is None:
            uncond_mask = torch.rand(batch_size, generator=generator, device=generator.device if generator else "cpu")
            uncond_mask = uncond_mask < self.uncond_prob
        uncond_mask = uncond_mask.to(x0.device).bool()
        uncond = expand_conditioning(as_conditioning(uncond_prompt_embeds), batch_size)
        embeds = where_conditioning(uncond_mask, uncond, as_conditioning(prompt_embeds))

        alpha, sigma = alpha_sigma(fake_score.alphas_cumprod.to(x0.device), timesteps, x0.ndim)
        x_t = alpha * x0 + sigma * noise
        eps_fake = fake_score(x_t, timesteps, embeds).eps
        # abar_t-weighted epsilon MSE: mse(a_t e_pi, a_t eps)
        loss = F.mse_loss(alpha * eps_fake, alpha * noise, reduction="mean")
        return loss, {"loss_fake_score": loss.detach()}


def clamped_clip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, tau: float = 0.37) -> torch.Tensor:
    r"""
    The clamped CLIP loss `max(0, tau - cos(img, txt))` per sample (SwiftBrush v2, used by SNOOPI): it stops pulling
    once an image is aligned enough, so it cannot override the distillation signal.

    Args:
        image_embeds, text_embeds (`torch.Tensor`): `(batch, dim)` CLIP projections (any scale; normalised here).
        tau (`float`, defaults to 0.37): the clamp.

    Returns:
        `torch.Tensor` of shape `(batch,)`.
    """
    cos = F.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)
    return (tau - cos).clamp(min=0)
