"""The shared VP math (the bottom floor: imported by schedulers, pipelines and losses, importing none of them).

One adapter from a diffusers UNet + noise schedule to the denoiser convention (x0 and eps), and the student's input
rule. Every loss, the pipelines and the student scheduler call `to_x0_eps` or `Denoiser` instead of branching on `prediction_type`
(k-diffusion's `external.py` idea). VP notation of METHODS.md: `x_t = a_t x0 + s_t eps`, `a_t = sqrt(abar_t)`,
`s_t = sqrt(1 - abar_t)`; CFG in the paper form `e(k) = (1 - k) e_uncond + k e_cond`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


__all__ = [
    "INPUT_TYPES",
    "PREDICTION_TYPES",
    "Denoiser",
    "DenoiserOutput",
    "alpha_sigma",
    "classifier_free_guidance",
    "consistency_function",
    "sigma_to_timestep",
    "student_input",
    "to_x0_eps",
]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
INPUT_TYPES = ("noise", "scaled_noise")


def alpha_sigma(
    alphas_cumprod: torch.Tensor, timesteps: torch.Tensor | int, ndim: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    `a_t = sqrt(abar_t)` and `s_t = sqrt(1 - abar_t)` in float32, shaped `(batch, 1, ..., 1)` with `ndim` dimensions so
    they broadcast against samples. Integer `timesteps` index the table; floating-point ones (continuous noise levels,
    ECT) interpolate `abar` linearly between the neighbouring integers, clamped to `[0, T - 1]`.
    """
    table = alphas_cumprod.to(torch.float32)
    timesteps = torch.as_tensor(timesteps, device=alphas_cumprod.device).reshape(-1)
    if timesteps.is_floating_point():
        t = timesteps.float().clamp(0, table.shape[0] - 1)
        low = t.floor().long().clamp(max=table.shape[0] - 2)
        abar = torch.lerp(table[low], table[low + 1], t - low)
    else:
        abar = table[timesteps.long()]
    abar = abar.reshape(-1, *([1] * (ndim - 1)))
    return abar.sqrt(), (1.0 - abar).sqrt()


def to_x0_eps(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    prediction_type: str = "epsilon",
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    Converts a network output at `x_t = sample` to `(x0, eps)`. Computed in float32: at `t = 999` on SD's schedule
    `a_t ~ 0.07`, and dividing a bf16 eps error by it is what makes one-step students speckle.

    Args:
        model_output (`torch.Tensor`): the network's prediction (`eps`, `v` or `x0`, per `prediction_type`).
        sample (`torch.Tensor`): the noisy input `x_t` the network saw.
        alpha, sigma (`torch.Tensor`): `a_t`, `s_t` broadcastable to `sample` (see `alpha_sigma`).
        prediction_type (`str`): one of `"epsilon"`, `"v_prediction"`, `"sample"`.

    Returns:
        `(x0, eps)` in float32.
    """
    out, x_t = model_output.float(), sample.float()
    if prediction_type == "epsilon":
        return (x_t - sigma * out) / alpha, out
    if prediction_type == "v_prediction":
        return alpha * x_t - sigma * out, sigma * x_t + alpha * out
    if prediction_type == "sample":
        return out, (x_t - alpha * out) / sigma
    raise ValueError(f"`prediction_type` must be one of {PREDICTION_TYPES}, got {prediction_type!r}.")


def classifier_free_guidance(
    uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float | torch.Tensor
) -> torch.Tensor:
    r"""
    `(1 - k) uncond + k cond` (k = 1: no guidance). `guidance_scale` may be a float or a per-sample tensor of shape
    `(batch,)`, broadcast over the remaining dimensions.
    """
    k = torch.as_tensor(guidance_scale, device=cond.device, dtype=cond.dtype)
    if k.ndim == 1:
        k = k.reshape(-1, *([1] * (cond.ndim - 1)))
    return uncond + k * (cond - uncond)


@dataclass
class DenoiserOutput:
    r"""
    Args:
        x0 (`torch.Tensor`): the denoised estimate, float32.
        eps (`torch.Tensor`): the noise estimate, float32.
    """

    x0: torch.Tensor
    eps: torch.Tensor


class Denoiser:
    r"""
    Wraps a denoising network and its training noise schedule so that callers get `x0` and `eps` whatever the
    `prediction_type` and whatever the backbone.

    Args:
        unet (`UNet2DConditionModel`, `PixArtTransformer2DModel` or a callable view of one): the network (teacher,
            fake score or student).
        alphas_cumprod (`torch.Tensor`): `abar_t` for `t` in `[0, num_train_timesteps)`.
        prediction_type (`str`): what the network predicts: `"epsilon"`, `"v_prediction"` or `"sample"`.
        backbone (`BackboneAdapter`, *optional*): turns the conditioning dict into the network call; defaults to the
            adapter of `unet` (`models.backbones.backbone_for`), the SD UNet one for objects it does not know.
    """

    def __init__(self, unet, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon", backbone=None):
        from .backbones import BACKBONES, backbone_for

        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"`prediction_type` must be one of {PREDICTION_TYPES}, got {prediction_type!r}.")
        if backbone is None:
            network = getattr(unet, "base", unet)
            try:
                backbone = backbone_for(network)
            except ValueError:
                backbone = BACKBONES["sd"]
        self.unet = unet
        self.alphas_cumprod = alphas_cumprod
        self.prediction_type = prediction_type
        self.backbone = backbone

    @classmethod
    def from_scheduler(cls, unet, scheduler, backbone=None) -> Denoiser:
        r"""Builds the adapter from any diffusers scheduler with `alphas_cumprod` (DDPM, DDIM, PNDM, ours, ...)."""
        return cls(unet, scheduler.alphas_cumprod, scheduler.config.prediction_type, backbone=backbone)

    def __call__(
        self,
        sample: torch.Tensor,
        timesteps: torch.Tensor | int,
        encoder_hidden_states: torch.Tensor | dict,
        guidance_scale: float | torch.Tensor | None = None,
        uncond_encoder_hidden_states: torch.Tensor | dict | None = None,
        cross_attention_kwargs: dict | None = None,
    ) -> DenoiserOutput:
        r"""
        Denoises `sample` (`x_t`, `(batch, C, H, W)`) at `timesteps` (scalar or `(batch,)`; integer, or floating
        point for continuous noise levels, passed to the network as they are and interpolated in the schedule).

        The conditioning is a dict for the backbone adapter (`{"encoder_hidden_states": ...}` for SD, plus
        `text_embeds` / `time_ids` for SDXL, `encoder_attention_mask` for PixArt); a tensor means SD's
        `encoder_hidden_states`. With `guidance_scale` (float or `(batch,)`) and the unconditional conditioning, the
        two branches run as one batched call and are combined by `classifier_free_guidance` on the raw outputs (every
        conversion is linear in the output, so this equals guiding `x0` or `eps`); a float `guidance_scale` of 1 runs
        the conditional branch alone.
        """
        from .backbones import cat_conditioning

        cond = encoder_hidden_states if isinstance(encoder_hidden_states, dict) else {
            "encoder_hidden_states": encoder_hidden_states
        }  # fmt: skip
        uncond = uncond_encoder_hidden_states
        if uncond is not None and not isinstance(uncond, dict):
            uncond = {**cond, "encoder_hidden_states": uncond}
        batch_size = sample.shape[0]
        timesteps = torch.as_tensor(timesteps, device=sample.device).reshape(-1)
        timesteps = (timesteps if timesteps.is_floating_point() else timesteps.long()).expand(batch_size)
        alpha, sigma = alpha_sigma(self.alphas_cumprod.to(sample.device), timesteps, sample.ndim)
        model_input = sample.to(self.unet.dtype)
        unit_scale = isinstance(guidance_scale, (int, float)) and guidance_scale == 1
        if guidance_scale is not None and uncond is not None and not unit_scale:
            model_output = self.backbone(
                self.unet, torch.cat([model_input, model_input]), torch.cat([timesteps, timesteps]),
                cat_conditioning(uncond, cond), cross_attention_kwargs,
            )  # fmt: skip
            uncond_output, cond_output = model_output.float().chunk(2)
            model_output = classifier_free_guidance(uncond_output, cond_output, guidance_scale)
        else:
            model_output = self.backbone(self.unet, model_input, timesteps, cond, cross_attention_kwargs)
        x0, eps = to_x0_eps(model_output, sample, alpha, sigma, self.prediction_type)
        return DenoiserOutput(x0=x0, eps=eps)

def student_input(
    alphas_cumprod: torch.Tensor, t_init: int, noise: torch.Tensor, input_type: str = "noise"
) -> torch.Tensor:
    r"""
    The one-step student's network input `x_{t_init}` for the initial noise `noise` (`(batch, C, H, W)`): `z` itself
    (`input_type="noise"`, SwiftBrush) or `s_{t_init} z`, i.e. `x_{t_init}` with `x0 = 0` (`"scaled_noise"`,
    SiD-LSG). The one rule used by `ConsistencyStudentScheduler` and by the training losses.
    """
    if input_type == "noise":
        return noise
    if input_type == "scaled_noise":
        _, sigma = alpha_sigma(alphas_cumprod.to(noise.device), t_init, noise.ndim)
        return (sigma * noise.float()).to(noise.dtype)
    raise ValueError(f"`input_type` must be one of {INPUT_TYPES}, got {input_type!r}.")


def sigma_to_timestep(alphas_cumprod: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    r"""Fractional timesteps `(batch,)` for EDM `sigmas`, by linear interpolation of log-sigma (clamped to `[0, T-1]`)."""
    abar = alphas_cumprod.to(device=sigmas.device, dtype=torch.float32)
    log_sigmas = (0.5 * ((1 - abar) / abar).log()).contiguous()
    log_sigma = sigmas.float().reshape(-1).clamp(min=1e-20).log()
    high = torch.searchsorted(log_sigmas, log_sigma).clamp(1, log_sigmas.shape[0] - 1)
    frac = (log_sigma - log_sigmas[high - 1]) / (log_sigmas[high] - log_sigmas[high - 1])
    return (high - 1 + frac).clamp(0, log_sigmas.shape[0] - 1)


def consistency_function(
    denoiser: Denoiser, sample: torch.Tensor, timesteps: torch.Tensor, cond, sigma_min: float,
    parametrization: str = "ddim", sigma_data: float = 0.5,
) -> torch.Tensor:  # fmt: skip
    r"""
    `f(x_t, t) = c_skip y + c_out x0_hat(x_t, t)`, `y = x_t / a_t`, at fractional `timesteps` `(batch,)`
    (the parametrizations: `losses.consistency`'s module docstring; shared by ECT / SCT and ACT). `sample` is `x_t` `(batch, C, H, W)`; `cond` a conditioning dict or SD's `encoder_hidden_states`.
    """
    alpha, sigma_t = alpha_sigma(denoiser.alphas_cumprod.to(sample.device), timesteps, sample.ndim)
    x0_hat = denoiser(sample, timesteps.float(), cond).x0  # fractional timesteps reach the network as they are
    sigma = sigma_t / alpha
    c_out = (sigma - sigma_min) / sigma  # both: exactly 0 at sigma_min (`sigma_min / sigma` is not exactly 1 in torch)
    if parametrization == "ddim":
        c_skip = 1 - c_out
    elif parametrization == "ect":
        sd2 = sigma_data**2
        c_skip = sd2 / ((sigma - sigma_min) ** 2 + sd2) - c_out * sd2 / (sigma**2 + sd2)
    else:
        raise ValueError(f"`parametrization` must be 'ddim' or 'ect', got {parametrization!r}.")
    return c_skip * (sample.float() / alpha) + c_out * x0_hat
