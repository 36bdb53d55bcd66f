"""Score identity Distillation (SiD) and its guided text-to-image form (SiD-LSG): one loss per player.

Papers (equation numbers could not be checked offline; the formulas follow the official code, cited by file:line):
    - Zhou et al., "Score identity Distillation: Exponentially Fast Distillation of Pretrained Diffusion Models for
      One-Step Generation", ICML 2024, arXiv 2404.04057, Section 4 / Algorithm 1 (`mingyuanzhou/SiD` `training/sid_loss.py`).
    - Zhou et al., "Guided Score identity Distillation for Data-Free One-Step Text-to-Image Generation" (SiD-LSG),
      ICLR 2025, arXiv 2406.01561: guidance `kappa_1..kappa_4` (`mingyuanzhou/SiD-LSG` `training/sid_training_loop.py`).

Fake score (loop L389-450): `x_t = a_t sg(x_g) + s_t eps`, `t ~ U{20..979}`, `sum ||e_psi(kappa_1) - eps||^2 / batch`,
`e(k) = (1 - k) e_uncond + k e_cond`, prompts dropped with p 0.1 when `kappa_1 != 1` or `kappa_2 != 1` (L208, L393).
The official v-prediction loss, v-MSE times `snr / (snr + 1)` (L438-441), equals this eps-MSE (`e_hat - eps = a_t
(v_hat - v)`). Generator (L472-533): the same `x_t` with gradient, `y_real` / `y_fake` the x0 (DDPM formula,
`sid_sd_util.py` L268-272) of the teacher with `kappa_4` and of `f_psi` with `kappa_2 = kappa_3`, `w_f = max(1e-5,
mean_CHW |x_g - y_real|)` detached (L522-523), `L = (y_real - y_fake)^T [(y_real - x_g) - alpha (y_real - y_fake)] / w_f`
(alpha = 1: `(y_real - y_fake)^T (y_fake - x_g) / w_f`, L525-528), times `loss_scaling / batch` (L530).
**No stop-gradient on `y_real`, `y_fake`**: gradients flow through both networks' inputs into `x_g`. Their parameters
are the caller's: keep the teacher frozen and call `fake_score.requires_grad_(False)` for the generator step (official
L330, L455), else backward fills the fake score's `.grad` (zero it before its own step). Samples with a non-finite
`x_g`, `y_real` or `y_fake` are dropped but counted in `batch` (L508-530); NaNs can still reach parameter grads through
the networks' backward, so `nan_to_num` the grads as the loop does (L541-543). Deviation: official masks NaN, we also
mask inf.
"""

from __future__ import annotations

import math

import torch

from ..models.backbones import as_conditioning, expand_conditioning, where_conditioning
from ..models.denoiser import Denoiser, alpha_sigma
from .generator import noise_and_timesteps


__all__ = ["SiDLoss"]


def _finite(x: torch.Tensor) -> torch.Tensor:
    """`(batch,)` bool: the sample has no NaN or inf."""
    return torch.isfinite(x).flatten(1).all(dim=1)


class SiDLoss:
    r"""
    The two players of SiD / SiD-LSG: `generator_loss` for `G`, `fake_score_loss` for the fake score `f_psi`.

    Networks are passed at call time as `Denoiser`s (any prediction type, any backbone); conditionings are dicts
    (`models.backbones`) or SD's `encoder_hidden_states` tensor. Randomness is drawn from `generator` unless given.

    Args:
        alpha (`float`, defaults to 1.0): SiD's `alpha` (1.0 for SD / SiD-LSG, 1.2 for SiD on EDM).
        guidance_scale_train_fake, guidance_scale_fake, guidance_scale_teacher (`float`, default to 1.0, the official
            CLI defaults): `kappa_1` (the fake score is trained on its guided eps), `kappa_2 = kappa_3` (the fake score
            in the generator loss), `kappa_4` (the teacher). LSG sets all equal (1.5-4.5; the official script runs 2).
        min_timestep, max_timestep (`int`, default to 20 and 979): `t ~ U{min..max}` in **both** losses (the official
            `randint(tmin=20, tmax=980)`, loop L413 and L484).
        uncond_prob (`float`, defaults to 0.1): the fake-score prompt dropout, active only when `kappa_1` or `kappa_2`
            is not 1.
        loss_scaling (`float`, defaults to 1.0): multiplies both losses (`--ls` / `--lsg`; 100 for G in SiD on EDM).
        min_weight_factor (`float`, defaults to 1e-5): the floor of `mean |x_g - y_real|`.
    """

    def __init__(
        self, *, alpha: float = 1.0, guidance_scale_train_fake: float = 1.0, guidance_scale_fake: float = 1.0,
        guidance_scale_teacher: float = 1.0, min_timestep: int = 20, max_timestep: int = 979, uncond_prob: float = 0.1,
        loss_scaling: float = 1.0, min_weight_factor: float = 1e-5,
    ):  # fmt: skip
        scales = (alpha, guidance_scale_train_fake, guidance_scale_fake, guidance_scale_teacher, loss_scaling)
        if not all(math.isfinite(v) for v in scales):
            raise ValueError(f"`alpha`, the guidance scales and `loss_scaling` must be finite, got {scales}.")
        if not 0 <= min_timestep <= max_timestep:
            raise ValueError(f"need 0 <= `min_timestep` <= `max_timestep`, got {min_timestep} and {max_timestep}.")
        if not 0.0 <= uncond_prob <= 1.0:
            raise ValueError(f"`uncond_prob` must be in [0, 1], got {uncond_prob}.")
        self.alpha, self.loss_scaling, self.min_weight_factor = float(alpha), float(loss_scaling), min_weight_factor
        self.guidance_scale_train_fake, self.guidance_scale_fake = guidance_scale_train_fake, guidance_scale_fake
        self.guidance_scale_teacher = guidance_scale_teacher
        self.min_timestep, self.max_timestep, self.uncond_prob = min_timestep, max_timestep, uncond_prob

    @classmethod
    def lsg(cls, guidance_scale: float, **kwargs) -> SiDLoss:
        r"""SiD-LSG: `kappa_1 = kappa_2 = kappa_3 = kappa_4 = guidance_scale` (1.5 best FID, 4.5 best CLIP on SD1.5)."""
        k = guidance_scale
        return cls(guidance_scale_train_fake=k, guidance_scale_fake=k, guidance_scale_teacher=k, **kwargs)

    def _draws(self, x_g, noise, timesteps, num_train_timesteps: int, generator):
        """The given `noise` / `timesteps`, or `eps ~ N(0, I)`, `t ~ U{min..max}` from `generator`."""
        if self.max_timestep >= num_train_timesteps:
            raise ValueError(f"`max_timestep` must be < {num_train_timesteps}, got {self.max_timestep}.")
        return noise_and_timesteps(x_g, noise, timesteps, self.min_timestep, self.max_timestep, generator)

    def sample_uncond_mask(self, batch_size: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        r"""
        `(batch_size,)` bool, `True` where the fake-score step drops the prompt. The official loop drops it *before*
        generating `x_g` (L393-411), so `G` sees `""` too: draw the mask once, use it for `G` and `fake_score_loss`.
        """
        if self.guidance_scale_train_fake == 1 and self.guidance_scale_fake == 1:
            return torch.zeros(batch_size, dtype=torch.bool)
        u = torch.rand(batch_size, generator=generator, device=generator.device if generator else "cpu")
        return (u < self.uncond_prob).cpu()

    def generator_loss(
        self, teacher: Denoiser, fake_score: Denoiser, x_g: torch.Tensor, prompt_embeds: torch.Tensor | dict,
        uncond_prompt_embeds: torch.Tensor | dict, *, noise: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None, generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
        r"""
        The generator's SiD loss. Gradients reach `x_g` directly and through both scores' inputs; only `w` is detached.

        Args:
            teacher, fake_score (`Denoiser`): `f_phi` and `f_psi`, both frozen for this step (see the module).
            x_g (`torch.Tensor`): `G(z, c)`, `(batch, C, H, W)`, with gradient.
            prompt_embeds, uncond_prompt_embeds (`dict` or `torch.Tensor`): the prompts' and the empty prompt's
                conditioning (`batch` rows; the empty prompt may have 1).
            noise, timesteps (`torch.Tensor`, *optional*): `eps` and `t` (`(batch,)` long), drawn when omitted.

        Returns:
            `(loss, logs)`: `loss_scaling * sum / batch` over the finite samples (0 if none: skip `backward` then), and
            detached values to log.
        """
        batch_size = x_g.shape[0]
        noise, timesteps = self._draws(x_g, noise, timesteps, teacher.alphas_cumprod.shape[0], generator)
        cond = as_conditioning(prompt_embeds)
        uncond = expand_conditioning(as_conditioning(uncond_prompt_embeds), batch_size)

        # 1. diffuse the generator's sample, with gradient: x_t = a_t x_g + s_t eps (one eps and t for both scores)
        x_g = x_g.float()
        alpha_t, sigma_t = alpha_sigma(teacher.alphas_cumprod.to(x_g.device), timesteps, x_g.ndim)
        x_t = alpha_t * x_g + sigma_t * noise
        # 2. y_real (kappa_4) and y_fake (kappa_2), the x0 predictions; no no_grad: their input carries G's gradient
        y_real = teacher(x_t, timesteps, cond, self.guidance_scale_teacher, uncond).x0
        y_fake = fake_score(x_t, timesteps, cond, self.guidance_scale_fake, uncond).x0
        # 3. drop non-finite samples before any arithmetic (NaN times a zero gradient is NaN); the divisor stays `batch`
        keep = _finite(x_g) & _finite(y_real) & _finite(y_fake)
        x_g, y_real, y_fake = x_g[keep], y_real[keep], y_fake[keep]
        # 4. the normaliser w = 1 / max(1e-5, mean |x_g - y_real|), per sample and detached
        with torch.no_grad():
            dims = tuple(range(1, x_g.ndim))
            weight_factor = (x_g - y_real).abs().mean(dim=dims, keepdim=True).clamp(min=self.min_weight_factor)
        # 5. L = (y_real - y_fake)^T [(y_real - x_g) - alpha (y_real - y_fake)] w; alpha = 1 written as the official code
        if self.alpha == 1:
            loss = (y_real - y_fake) * (y_fake - x_g) / weight_factor
        else:
            loss = (y_real - y_fake) * ((y_real - x_g) - self.alpha * (y_real - y_fake)) / weight_factor
        loss = loss.sum() * (self.loss_scaling / batch_size)
        mean_weight_factor = weight_factor.mean() if keep.any() else x_t.new_zeros(())
        return loss, {"loss_sid": loss.detach(), "num_nonfinite": (~keep).sum(), "weight_factor": mean_weight_factor}

    def fake_score_loss(
        self, fake_score: Denoiser, x_g: torch.Tensor, prompt_embeds: torch.Tensor | dict,
        uncond_prompt_embeds: torch.Tensor | dict, *, noise: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None, uncond_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
        r"""
        Denoising score matching of `f_psi` on `sg(x_g)` with its `kappa_1`-guided eps (LSG's guided fake score).

        Args:
            fake_score (`Denoiser`): `f_psi`, trainable.
            x_g (`torch.Tensor`): the generator's samples; detached here.
            prompt_embeds, uncond_prompt_embeds, noise, timesteps: as in `generator_loss`.
            uncond_mask (`torch.Tensor`, *optional*): `(batch,)` bool, `True` where `""` replaces the prompt; drawn by
                `sample_uncond_mask` when omitted.

        Returns:
            `(loss, logs)`: `loss_scaling * sum ||e_psi - eps||^2 / batch` over the finite samples.
        """
        x_g, batch_size = x_g.detach().float(), x_g.shape[0]
        noise, timesteps = self._draws(x_g, noise, timesteps, fake_score.alphas_cumprod.shape[0], generator)
        if uncond_mask is None:
            uncond_mask = self.sample_uncond_mask(batch_size, generator=generator)
        uncond = expand_conditioning(as_conditioning(uncond_prompt_embeds), batch_size)
        cond = where_conditioning(uncond_mask.to(x_g.device).bool(), uncond, as_conditioning(prompt_embeds))

        alpha_t, sigma_t = alpha_sigma(fake_score.alphas_cumprod.to(x_g.device), timesteps, x_g.ndim)
        x_t = alpha_t * x_g + sigma_t * noise
        eps_fake = fake_score(x_t, timesteps, cond, self.guidance_scale_train_fake, uncond).eps
        keep = _finite(x_g) & _finite(eps_fake)
        loss = ((eps_fake[keep] - noise[keep]) ** 2).sum() * (self.loss_scaling / batch_size)
        return loss, {"loss_fake_score": loss.detach(), "num_nonfinite_fake": (~keep).sum()}
