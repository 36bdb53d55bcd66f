"""Easy Consistency Tuning (ECT) and its stable-target variant (SCT) for VP / latent eps- or v-prediction UNets.

Papers: Geng et al., "Consistency Models Made Easy", arXiv 2406.14548 (ECT; formulas follow `locuslab/ect`
`training/loss.py` L45-92 on `main`, L78-135 on `imgnet`); Wang, Geng and Li, "Stable Consistency Tuning: Understanding and
Improving Consistency Models", arXiv 2410.18958 (SCT; its repository, G-U-N/Stable-Consistency-Tuning, holds only a
README: no code). Equation numbers could not be checked offline.

ECT, in EDM sigma: `sigma_t ~ LogNormal(P_mean, P_std)`, `r = clamp(t (1 - (1 + k sigmoid(-b t)) / q^(stage+1)), 0)`
(L45-50), one `eps` for `x_t` and `x_r` (L62-64), the torch RNG state restored before the target's forward so that
both share the dropout mask (L67-71), target `nan_to_num(sg(f(x_r, r)))` with the current weights, `x0` where
`r = 0` (L72-79), `sqrt(|d|^2 + c^2) - c` (c = 0: `|d|`, L82-89), times `1 / (t - r)` (L92, CIFAR) or
`(t^2 + s_d^2) / (t s_d)^2` (`imgnet` L85-88, with q 4, c 0.06).

VP mapping (ours): `sigma = s_t / a_t`, `y = x_t / a_t = x0 + sigma eps`. A sampled sigma is clamped to the schedule's
`[sigma(0), sigma(T-1)]` and mapped to a *fractional* timestep by interpolating log-sigma; `abar` at fractional `t` is
linearly interpolated and the sigma actually used is recomputed from it. `r` below `sigma_min` or `sigma(0)` is 0.
Consistency function `f = c_skip y + c_out x0_hat` with `c_skip = sigma_min / sigma`, `c_out = 1 - c_skip`
(`"ddim"`: the DDIM jump to `t_min`, `x0_hat + sigma_min eps_hat`): `f(x, t_min) = x / a_{t_min}` exactly, exact for
a one-point data set, and `f = x0_hat` (the pretrained teacher, as ECT's training-mode `ECMPrecond`, `networks.py`
L706-708) when `sigma_min = 0`. `"ect"` rewrites ECT's eval-mode coefficients (L710-711, boundary at `sigma_min`) onto
`x0_hat = D`: `c_out = (sigma - sigma_min) / sigma`, `c_skip = s_d^2 / ((sigma - sigma_min)^2 + s_d^2) - c_out
s_d^2 / (sigma^2 + s_d^2)`. *Unverified*: which of the two tunes SD UNets better; ECT's P_mean / P_std / c for latents.

SCT (`target="stf"`): `eps` in the step `x_t -> x_r` is replaced by the stable-target-field estimate `eps_hat(x_t) =
sum_i w_i (x_t - a_t x0_i) / s_t`, `w_i = softmax_i(-|x_t - a_t x0_i|^2 / (2 s_t^2))` over the reference batch (the
batch itself unless given) restricted to the same `group` (prompt / class); `y_r = y_t - (sigma_t - sigma_r) eps_hat`
(one Euler step of the PF-ODE; with one reference it is ECT's `x_r`). *Unverified* (paper text only): that Euler step,
keeping the target `x0` (not the STF mean) where `r = 0`; SCT's multistep training and edge-skipping are not here.
"""

from __future__ import annotations

import torch

from ..models.denoiser import Denoiser, alpha_sigma, consistency_function, sigma_to_timestep


__all__ = ["ConsistencyTuningLoss", "consistency_function", "ect_r", "sigma_to_timestep"]  # the last two: models.denoiser


def ect_r(t: torch.Tensor, stage: int, q: float = 2.0, k: float = 8.0, b: float = 1.0) -> torch.Tensor:
    r"""ECT's sigmoid rule in EDM sigma: `r = clamp(t (1 - (1 + k sigmoid(-b t)) / q^(stage + 1)), 0)`."""
    return torch.clamp(t * (1 - (1 + k * torch.sigmoid(-b * t)) / q ** (stage + 1)), min=0)


class ConsistencyTuningLoss:
    r"""
    ECT / SCT consistency tuning of a `Denoiser` on real latents; `stage` (ECT: `cur_tick // double`) halves `t - r`.

    Args:
        P_mean, P_std (`float`, default to -1.1 and 2.0): the log-normal of EDM sigma (ECT's CIFAR / ImageNet values).
        q, k, b (`float`, default to 2, 8, 1): `ect_r` (ECT's ImageNet branch: q = 4).
        c (`float`, defaults to 0.0): the pseudo-Huber constant (0: plain L2 norm, ECT CIFAR; 0.06 ImageNet).
        weighting (`str`, defaults to `"inv_dt"`): `1 / (t - r)` or `"snr_plus_k"`, `(t^2 + s_d^2) / (t s_d)^2`.
        sigma_data (`float`, defaults to 0.5): `s_d` of the weighting and of the `"ect"` parametrization.
        sigma_min (`float`, *optional*): the boundary level; defaults to the schedule's `sigma(t = 0)`.
        parametrization (`str`, defaults to `"ddim"`): `"ddim"` or `"ect"` (module docstring).
        target (`str`, defaults to `"ect"`): `"ect"` (shared-noise `x_r`) or `"stf"` (SCT's variance-reduced step).
    """

    def __init__(
        self, *, P_mean: float = -1.1, P_std: float = 2.0, q: float = 2.0, k: float = 8.0, b: float = 1.0,
        c: float = 0.0, weighting: str = "inv_dt", sigma_data: float = 0.5, sigma_min: float | None = None,
        parametrization: str = "ddim", target: str = "ect",
    ):  # fmt: skip
        if weighting not in ("inv_dt", "snr_plus_k") or target not in ("ect", "stf") or c < 0:
            raise ValueError(f"bad `weighting` {weighting!r}, `target` {target!r} or `c` {c}.")
        self.P_mean, self.P_std, self.q, self.k, self.b, self.c = P_mean, P_std, q, k, b, c
        self.weighting, self.sigma_data, self.sigma_min = weighting, sigma_data, sigma_min
        self.parametrization, self.target, self.stage = parametrization, target, 0

    def sample_sigmas(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        r"""`(batch_size,)` EDM noise levels `exp(P_mean + P_std n)`, `n ~ N(0, 1)` drawn on `generator`'s device."""
        device = generator.device if generator is not None else "cpu"
        return (torch.randn(batch_size, generator=generator, device=device) * self.P_std + self.P_mean).exp()

    def _f(self, denoiser, x, timesteps, cond, sigma_min):
        return consistency_function(denoiser, x, timesteps, cond, sigma_min, self.parametrization, self.sigma_data)

    def __call__(
        self, denoiser: Denoiser, latents: torch.Tensor, encoder_hidden_states, *, group: torch.Tensor | None = None,
        reference_latents: torch.Tensor | None = None, reference_group: torch.Tensor | None = None,
        noise: torch.Tensor | None = None, sigmas: torch.Tensor | None = None, r_sigmas: torch.Tensor | None = None,
        generator: torch.Generator | None = None, target_denoiser: Denoiser | None = None,
    ) -> tuple[torch.Tensor, dict]:  # fmt: skip
        r"""
        The unreduced loss `(batch,)` of `latents` `x0` `(batch, C, H, W)` and logs. `sigmas` / `r_sigmas` (EDM,
        `(batch,)`) and `noise` are drawn (from `generator`) unless given; `group` `(batch,)` ids the condition.
        `target_denoiser` (default `denoiser`) computes the no-grad target: the same weights, e.g. the unwrapped
        network where `denoiser` goes through a DDP module.
        """
        batch, device, abar = latents.shape[0], latents.device, denoiser.alphas_cumprod.to(latents.device)
        x0 = latents.float()
        gen_device = generator.device if generator is not None else "cpu"
        # 1. t ~ LogNormal(P_mean, P_std) in sigma, then to a fractional timestep (sigma recomputed from it)
        if sigmas is None:
            sigmas = self.sample_sigmas(batch, generator)
        timesteps = sigma_to_timestep(abar, sigmas.to(device))
        a_t, s_t = alpha_sigma(abar, timesteps, x0.ndim)
        a_0, s_0 = alpha_sigma(abar, torch.zeros(1, device=device), 1)
        sigma_t, sigma_0 = s_t / a_t, float(s_0 / a_0)
        sigma_min = sigma_0 if self.sigma_min is None else self.sigma_min
        # 2. r from the stage's sigmoid rule; below sigma_min it is 0 (target x0)
        r = ect_r(sigma_t, self.stage, self.q, self.k, self.b) if r_sigmas is None else r_sigmas.to(device)
        r = r.reshape(sigma_t.shape)
        sigma_floor = max(sigma_min, sigma_0)
        r_timesteps = sigma_to_timestep(abar, r.clamp(min=sigma_floor))
        a_r, s_r = alpha_sigma(abar, r_timesteps, x0.ndim)
        has_r = (r >= sigma_floor) & (s_r / a_r < sigma_t)  # r under the schedule's or the boundary's sigma: r = 0
        r = torch.where(has_r, s_r / a_r, torch.zeros_like(r))
        # 3. shared noise: x_t = a_t x0 + s_t eps, x_r = a_r x0 + s_r eps (SCT: Euler step with the STF estimate)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=gen_device)
        noise = noise.to(device).float()
        x_t = a_t * x0 + s_t * noise
        if self.target == "ect":
            x_r = a_r * x0 + s_r * noise
        else:
            eps_hat = self.stf_eps(x_t, a_t, s_t, group, reference_latents, reference_group, x0)
            x_r = a_r * (x_t / a_t - (sigma_t - s_r / a_r) * eps_hat)
        # 4. student with gradient, then the target with the current weights and the same dropout mask
        cpu_state = torch.get_rng_state()
        cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        f_t = self._f(denoiser, x_t, timesteps, encoder_hidden_states, sigma_min)
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)
        with torch.no_grad():
            target_net = denoiser if target_denoiser is None else target_denoiser
            f_r = torch.nan_to_num(self._f(target_net, x_r, r_timesteps, encoder_hidden_states, sigma_min))
        target = torch.where(has_r, f_r, x0)
        # 5. pseudo-Huber of the per-sample L2, times the weighting (both in sigma)
        distance = ((f_t - target) ** 2).flatten(1).sum(dim=1)
        distance = (distance + self.c**2).sqrt() - self.c
        t, r = sigma_t.flatten(), r.flatten()
        weight = (
            1 / (t - r) if self.weighting == "inv_dt" else (t**2 + self.sigma_data**2) / (t * self.sigma_data) ** 2
        )
        loss = distance * weight
        return loss, {"loss_ct": loss.detach().mean(), "sigma": t.detach(), "r": r.detach(), "timesteps": timesteps}

    @staticmethod
    def stf_eps(x_t, a_t, s_t, group=None, reference_latents=None, reference_group=None, latents=None) -> torch.Tensor:
        r"""
        SCT's `eps_hat(x_t) = sum_i w_i (x_t - a_t x0_i) / s_t`, `w_i = softmax_i(-|x_t - a_t x0_i|^2 / (2 s_t^2))`
        over `reference_latents` `(N, C, H, W)` (default: `latents`), only those with `reference_group == group`.
        """
        ref = (latents if reference_latents is None else reference_latents).float()
        if group is not None and reference_group is None:
            reference_group = group
        diff = x_t.unsqueeze(1) - a_t.unsqueeze(1) * ref.unsqueeze(0)  # (batch, N, C, H, W)
        logits = -diff.flatten(2).pow(2).sum(-1) / (2 * s_t.flatten()[:, None] ** 2)
        if group is not None:
            logits = logits.masked_fill(group.reshape(-1, 1) != reference_group.reshape(1, -1), float("-inf"))
        weights = torch.softmax(logits, dim=1).reshape(*logits.shape, *([1] * (x_t.ndim - 1)))
        return (weights * diff).sum(dim=1) / s_t
