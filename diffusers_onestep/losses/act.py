"""ACT: consistency training plus a discriminator at every noise level (Kong et al., CVPR 2024, arXiv 2311.14097).

Read from the official `kong13661/ACT` (commit 94e0853; `train_cifar10.py`, `train_imagenet64.py`,
`models/consistency_wrapper.py`), cited by file and line:

- CT (no teacher): a Karras grid of `N` points `sigma_i = (s_min^(1/rho) + i/(N-1) (s_max^(1/rho) - s_min^(1/rho)))^rho`
  (`consistency_wrapper.py` L119-123, rho 7); `n+1 ~ U{1..N-1}` (L140-143); `x_{n+1}`, `x_n` from the same noise
  (L39-40); target `f_ema(x_n, sigma_n)` under no-grad from the **EMA** student (`train_cifar10.py` L277-278);
  `N(k) = round(sqrt(k/K (s1^2 - s0^2) + s0^2))` (L312-324, s0 2, s1 150) and the EMA decay
  `mu(k) = mu0^(s0 / (N(k) - 1))` (L429-431, mu0 0.9).
- Adversarial: D fakes are the online `f(x_t, t)` (no-grad) at a fresh grid point, D reals the clean data with an
  independently drawn grid point (L241-265); non-saturating logistic losses `softplus(D(fake)) + softplus(-D(real))`
  and `softplus(-D(f))` for the generator (L134-135, L297-303); lazy R1 `(gamma/2) mean |grad_x D(real)|^2`, gamma 10,
  every 16 steps, not rescaled by 16 (L125-132); G loss `lerp(L_CT, L_adv, lambda)` and the whole D loss times lambda
  (L239, L294). lambda is 0.3 (CIFAR) or per sample `lambda (n / (N-1))^(log_0.5(w_mid / lambda))` (ImageNet:
  lambda 0.6, w_mid 0.2, `train_imagenet64.py` L172-177, on every G and D term and on R1).

Adapted (ours): the VP / latent setting of `losses.consistency` (the grid spans the teacher schedule's
`[sigma(0), sigma(T-1)]` and reaches the network as fractional timesteps; `f = consistency_function`, exact at the
grid's first point); the distance is pseudo-Huber with iCT's `c = 0.00054 sqrt(d)` (ACT: LPIPS on pixels, pass
`distance=` for it); ACT-Aug's adaptive augmentation is not implemented.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..models.denoiser import Denoiser, alpha_sigma, consistency_function, sigma_to_timestep


__all__ = ["ACTLoss", "adversarial_weights", "ct_bins", "ct_ema_decay", "karras_sigmas", "pseudo_huber"]


def karras_sigmas(bins: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    r"""The `bins` Karras points from `sigma_min` to `sigma_max` (float64)."""
    ramp = torch.linspace(0, 1, bins, dtype=torch.float64)
    return (sigma_min ** (1 / rho) + ramp * (sigma_max ** (1 / rho) - sigma_min ** (1 / rho))) ** rho


def ct_bins(step: int, total_steps: int, s0: int = 2, s1: int = 150) -> int:
    r"""ACT's curriculum `N(k) = round(sqrt(k / K (s1^2 - s0^2) + s0^2))` (grid points, not intervals)."""
    return int(round(math.sqrt(step / max(total_steps, 1) * (s1**2 - s0**2) + s0**2)))


def ct_ema_decay(bins: int, mu0: float = 0.9, s0: int = 2) -> float:
    r"""The target EMA's decay `mu0^(s0 / (N - 1))` (0.81 at N = 2, 0.99859 at N = 150 for mu0 0.9)."""
    return mu0 ** (s0 / (bins - 1))


def adversarial_weights(index: torch.Tensor, bins: int, weight: float, mid_weight: float | None = None) -> torch.Tensor:
    r"""Per-sample lambda: `weight`, or `weight (n / (N-1))^(log_0.5(mid_weight / weight))` (`mid_weight` at mid grid)."""
    if mid_weight is None or weight == 0:
        return torch.full(index.shape, float(weight), device=index.device)
    power = math.log(mid_weight / weight) / math.log(0.5)
    return weight * (index.float() / (bins - 1)) ** power


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float | None = None) -> torch.Tensor:
    r"""`sqrt(|a - b|^2 + c^2) - c` per sample; `c=None` takes iCT's `0.00054 sqrt(d)`, `d` = elements per sample."""
    c = 0.00054 * math.sqrt(a[0].numel()) if c is None else c
    return ((a.float() - b.float()) ** 2).flatten(1).sum(1).add(c**2).sqrt() - c


class ACTLoss:
    r"""
    ACT's generator and discriminator losses on latents, for a `Denoiser` student, its EMA (the CT target) and a
    discriminator `D(x, t, text) -> (batch,)` (`models.LatentDiscriminator`).

    Args:
        adversarial_weight (`float`, defaults to 0.3): lambda (ACT CIFAR; ImageNet 0.6 with `mid_weight` 0.2). 0 is plain CT.
        mid_weight (`float`, *optional*): lambda at the grid's middle (the per-noise-level schedule); `None`: constant.
        r1_gamma (`float`, defaults to 10), r1_interval (`int`, defaults to 16): the lazy R1 penalty.
        huber_c (`float`, *optional*): pseudo-Huber `c` (default iCT's `0.00054 sqrt(d)`); `distance` overrides it.
        rho (`float`, defaults to 7), bins_min / bins_max (`int`, default to 2 / 150), ema_decay_init (defaults to 0.9).
    """

    def __init__(
        self, *, adversarial_weight: float = 0.3, mid_weight: float | None = None, r1_gamma: float = 10.0,
        r1_interval: int = 16, huber_c: float | None = None, rho: float = 7.0, bins_min: int = 2, bins_max: int = 150,
        ema_decay_init: float = 0.9, distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ):  # fmt: skip
        if not 0 <= adversarial_weight <= 1 or bins_min < 2 or bins_max < bins_min:
            raise ValueError(f"bad `adversarial_weight` {adversarial_weight} or bins ({bins_min}, {bins_max}).")
        if mid_weight is not None and not 0 < mid_weight <= adversarial_weight:
            raise ValueError(f"`mid_weight` must be in (0, adversarial_weight = {adversarial_weight}], got {mid_weight}.")
        self.weight, self.mid_weight, self.r1_gamma, self.r1_interval = adversarial_weight, mid_weight, r1_gamma, r1_interval
        self.rho, self.bins_min, self.bins_max, self.mu0 = rho, bins_min, bins_max, ema_decay_init
        self.distance = distance or (lambda a, b: pseudo_huber(a, b, huber_c))
        self.uses_discriminator = adversarial_weight > 0

    def bins(self, step: int, total_steps: int) -> int:
        return ct_bins(step, total_steps, self.bins_min, self.bins_max)

    def ema_decay(self, bins: int) -> float:
        return ct_ema_decay(bins, self.mu0, self.bins_min)

    def grid(self, alphas_cumprod: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        r"""`(sigmas, timesteps, sigma_min)`: the Karras grid over the VP schedule's range, as fractional timesteps."""
        abar = alphas_cumprod.double().cpu()
        sigma = ((1 - abar) / abar).sqrt()
        sigmas = karras_sigmas(bins, float(sigma[0]), float(sigma[-1]), self.rho)
        timesteps = sigma_to_timestep(alphas_cumprod, sigmas.float().to(alphas_cumprod.device))
        a, s = alpha_sigma(alphas_cumprod, timesteps[:1], 1)
        return sigmas, timesteps, float(s / a)

    @staticmethod
    def sample_indices(batch_size: int, bins: int, generator: torch.Generator | None = None) -> torch.Tensor:
        r"""`(batch_size,)` grid indices `n + 1 ~ U{1 .. N-1}` (CPU)."""
        return torch.randint(1, bins, (batch_size,), generator=generator)

    def consistency(
        self, denoiser: Denoiser, latents: torch.Tensor, cond, *, bins: int, indices: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""`(f(x_n, t_n), t_n)` at grid `indices` `n` `(batch,)`, `x_n = a_n x0 + s_n noise` (no-grad by the caller's
        choice: the EMA target at `n`, the online fakes of D's step)."""
        acp = denoiser.alphas_cumprod.to(latents.device)
        _, timesteps, sigma_min = self.grid(acp, bins)
        t = timesteps[indices.to(latents.device)]
        a, s = alpha_sigma(acp, t, latents.ndim)
        x_t = a * latents.float() + s * noise.to(latents.device).float()
        return consistency_function(denoiser, x_t, t, cond, sigma_min), t

    def generator_loss(
        self, student: Denoiser, discriminator, latents: torch.Tensor, cond, text: torch.Tensor,
        target: torch.Tensor, *, bins: int, indices: torch.Tensor, noise: torch.Tensor,
    ) -> tuple[torch.Tensor, dict]:  # fmt: skip
        r"""
        Per-sample `(1 - lambda_i) d(f(x_{n+1}), target) + lambda_i softplus(-D(f(x_{n+1}), t_{n+1}, text))` of
        `latents` `x0` at grid `indices` `n + 1` `(batch,)` with shared `noise`. `target` is the EMA student's
        `consistency(..., indices=indices - 1)` (the same noise); `text` is `pooled_text(cond)`; `discriminator` may be
        `None` when lambda is 0 (then the loss is plain CT).
        """
        f_online, t_next = self.consistency(student, latents, cond, bins=bins, indices=indices, noise=noise)
        loss_ct = self.distance(f_online, target.detach())
        logs = {"loss_ct": loss_ct.detach().mean(), "bins": torch.tensor(float(bins))}
        if discriminator is None:
            if self.weight != 0:
                raise ValueError("a `discriminator` is needed when `adversarial_weight` > 0.")
            return loss_ct, logs
        lam = adversarial_weights(indices.to(latents.device), bins, self.weight, self.mid_weight)
        loss_adv = F.softplus(-discriminator(f_online, t_next, text)).float()
        logs["loss_adv"] = loss_adv.detach().mean()
        return torch.lerp(loss_ct, loss_adv, lam), logs

    def discriminator_loss(
        self, discriminator, fake: torch.Tensor, fake_indices: torch.Tensor, fake_text: torch.Tensor,
        real: torch.Tensor, real_indices: torch.Tensor, real_text: torch.Tensor, *, bins: int,
        alphas_cumprod: torch.Tensor, r1: bool,
    ) -> tuple[torch.Tensor, dict]:  # fmt: skip
        r"""
        `lambda [mean w softplus(D(fake)) + mean w softplus(-D(real)) + R1]` (scalar), `w` the per-level schedule (1 when
        constant). `fake` are detached `f(x_t, t)` at grid `fake_indices`, `real` clean latents paired with independent
        `real_indices`; R1 `(gamma / 2) mean w |grad_real D|^2` when `r1` (the lazy step).
        """
        _, timesteps, _ = self.grid(alphas_cumprod.to(real.device), bins)
        w_fake, w_real = (adversarial_weights(i.to(real.device), bins, 1.0, None if self.mid_weight is None else
                                              self.mid_weight / self.weight) for i in (fake_indices, real_indices))  # fmt: skip
        loss_fake = (w_fake * F.softplus(discriminator(fake.detach(), timesteps[fake_indices.to(real.device)],
                                                       fake_text))).mean()  # fmt: skip
        real = real.detach().float().requires_grad_(r1)
        logits_real = discriminator(real, timesteps[real_indices.to(real.device)], real_text)
        loss_real = (w_real * F.softplus(-logits_real)).mean()
        loss = loss_fake + loss_real
        logs = {"loss_d_fake": loss_fake.detach(), "loss_d_real": loss_real.detach()}
        if r1:
            (grad,) = torch.autograd.grad(logits_real.sum(), real, create_graph=True)
            penalty = self.r1_gamma / 2 * (w_real * grad.flatten(1).pow(2).sum(1)).mean()
            loss, logs["r1"] = loss + penalty, penalty.detach()
        return self.weight * loss, logs
