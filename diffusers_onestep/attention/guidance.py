"""The two attention-space negative guidances: what combines the positive and the negative attention outputs.

Both act per attention layer on the outputs before the output projection, `Z+` (the image queries attending to the
positive text) and `Z-` (the same queries, the same key/value projections, the negative text):

- **NASA** (Negative-Away Steer Attention, SNOOPI, Nguyen et al., arXiv 2412.02687, Eq. 7): `Z = Z+ - alpha Z-`.
- **NAG** (Normalized Attention Guidance, Chen et al., arXiv 2505.21179, Eq. 5-7): the extrapolation
  `Z~ = Z+ + phi (Z+ - Z-)`, per token `R = |Z~|_p / |Z+|_p`, `Z^ = (min(R, tau) / R) Z~`, and the blend
  `Z = alpha Z^ + (1 - alpha) Z+`. The paper writes the L1 norm; the official Flux code uses L2 (`norm_p=2`). The
  official code passes the scale as `phi + 1` (`nag_scale`); here `scale` is the paper's `phi`.

Relation: `Z+ - a Z-` equals `(1 - a) [(1 + phi) Z+ - phi Z-]` with `phi = a / (1 - a)`: NASA is NAG's extrapolation
without the clipping and the blend, shrunk by `(1 - a)` (`nasa_as_nag_extrapolation` below).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


__all__ = [
    "NAG_DEFAULTS",
    "NAGGuidance",
    "NASAGuidance",
    "NegativeGuidance",
    "make_guidance",
    "nasa_as_nag_extrapolation",
]

# NAG's per-family defaults (phi, tau, alpha) from the paper (arXiv 2505.21179, Sec. 5 and its appendix); SD3 uses the
# SD3.5 row and PixArt-α the PixArt-Σ row (the paper reports no separate values for them).
NAG_DEFAULTS: dict[str, tuple[float, float, float]] = {
    "sd": (2.0, 2.5, 0.375),
    "sdxl": (2.0, 2.5, 0.5),
    "pixart": (4.0, 2.5, 0.375),
    "sd3": (4.0, 2.5, 0.125),
    "flux": (4.0, 2.5, 0.25),
}


def _check_range(name: str, value, low: float, high: float | None = None, low_open: bool = False) -> None:
    values = torch.as_tensor(value, dtype=torch.float32)
    bad = (values <= low) if low_open else (values < low)
    if high is not None:
        bad = bad | (values > high)
    if not torch.isfinite(values).all() or bad.any():
        bound = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
        raise ValueError(f"`{name}` must be finite and {bound}, got {value}.")


@dataclass
class NegativeGuidance(ABC):
    r"""
    Abstract base: `combine(z_pos, z_neg)` returns the attention output used in place of `Z+`; `end` is the fraction of
    the denoising trajectory (from the noisy end, by the network's timestep as a fraction of the training range) the
    guidance is applied to: active while `t / T >= 1 - end`, as NAG's `nag_end`.
    """

    end: float = 1.0


    def __post_init__(self):
        _check_range("end", self.end, 0.0, 1.0, low_open=True)

    @property
    @abstractmethod
    def is_identity(self) -> bool:
        """Whether `combine(z_pos, z_neg)` is `z_pos` for every input (scale 0): then nothing is installed."""

    @abstractmethod
    def combine(self, z_pos: torch.Tensor, z_neg: torch.Tensor) -> torch.Tensor:
        """The attention output used in place of `z_pos`."""

    def active_at(self, fraction: float | None) -> bool:
        """Whether the guidance applies at a network call whose timestep is `fraction` of the training range."""
        return fraction is None or self.end >= 1.0 or fraction >= 1.0 - self.end


def _per_sample(value, reference: torch.Tensor) -> torch.Tensor | float:
    if isinstance(value, (int, float)):
        return value
    value = torch.as_tensor(value, device=reference.device, dtype=reference.dtype)
    return value.reshape(-1, *([1] * (reference.ndim - 1))) if value.ndim == 1 else value


@dataclass
class NASAGuidance(NegativeGuidance):
    r"""NASA (SNOOPI Eq. 7): `Z = Z+ - scale * Z-`. `scale` may be a `(batch,)` tensor (one `alpha` per sample)."""

    scale: float | torch.Tensor = 0.1


    def __post_init__(self):
        super().__post_init__()
        _check_range("scale", self.scale, 0.0)

    @property
    def is_identity(self) -> bool:
        return isinstance(self.scale, (int, float)) and self.scale == 0

    def combine(self, z_pos, z_neg):
        return z_pos - _per_sample(self.scale, z_pos) * z_neg


@dataclass
class NAGGuidance(NegativeGuidance):
    r"""
    NAG (arXiv 2505.21179): `Z~ = Z+ + scale (Z+ - Z-)`, clipped per token to `tau` times `|Z+|_p`, blended with `Z+`
    by `alpha`. `scale` is the paper's `phi` (the official code's `nag_scale` is `phi + 1`); `norm_p` 1 as in the
    paper, 2 as the official Flux code.
    """

    scale: float = 2.0
    tau: float = 2.5
    alpha: float = 0.375
    norm_p: float = 1.0


    def __post_init__(self):
        super().__post_init__()
        _check_range("scale", self.scale, 0.0)
        _check_range("tau", self.tau, 1.0)
        _check_range("alpha", self.alpha, 0.0, 1.0)
        if self.norm_p not in (1, 2):
            raise ValueError(f"`norm_p` must be 1 (the paper) or 2 (the official Flux code), got {self.norm_p}.")

    @property
    def is_identity(self) -> bool:
        return self.scale == 0 or self.alpha == 0

    def combine(self, z_pos, z_neg):
        guided = z_pos + self.scale * (z_pos - z_neg)
        norm_pos = torch.linalg.vector_norm(z_pos.float(), ord=self.norm_p, dim=-1, keepdim=True)
        norm_guided = torch.linalg.vector_norm(guided.float(), ord=self.norm_p, dim=-1, keepdim=True)
        ratio = norm_guided / norm_pos.clamp_min(torch.finfo(torch.float32).tiny)
        # min(R, tau) / R, with R = 0 (a zero token) left as it is
        factor = torch.where(ratio > self.tau, self.tau / ratio.clamp_min(self.tau), torch.ones_like(ratio))
        clipped = guided * factor.to(guided.dtype)
        return self.alpha * clipped + (1 - self.alpha) * z_pos


def nasa_as_nag_extrapolation(alpha: float) -> tuple[float, float]:
    r"""`(phi, shrink)` with `Z+ - alpha Z- == shrink * ((1 + phi) Z+ - phi Z-)`: `phi = alpha / (1 - alpha)`."""
    if not 0 <= alpha < 1:
        raise ValueError(f"`alpha` must be in [0, 1) for the NAG form, got {alpha}.")
    return alpha / (1 - alpha), 1 - alpha


def make_guidance(method: str, family: str | None = None, *, scale=None, tau=None, alpha=None, end=1.0,
                  norm_p=None) -> NegativeGuidance:  # fmt: skip
    r"""
    The guidance `method` (`"nasa"` or `"nag"`) with its parameters; NAG's unset ones come from `NAG_DEFAULTS[family]`
    (`norm_p` 2 for Flux as its official code, else 1). NASA's `scale` defaults to 0.1.
    """
    if method == "nasa":
        if tau is not None or alpha is not None or norm_p is not None:
            raise ValueError("`tau`, `alpha` and `norm_p` are NAG's parameters: NASA (`method='nasa'`) takes `scale`.")
        return NASAGuidance(scale=0.1 if scale is None else scale, end=end)
    if method == "nag":
        phi, default_tau, default_alpha = NAG_DEFAULTS.get(family, NAG_DEFAULTS["sd"])
        return NAGGuidance(
            scale=phi if scale is None else scale, tau=default_tau if tau is None else tau,
            alpha=default_alpha if alpha is None else alpha, end=end,
            norm_p=(2.0 if family == "flux" else 1.0) if norm_p is None else norm_p,
        )  # fmt: skip
    raise ValueError(f"`method` must be one of 'nasa', 'nag', got {method!r}.")
