"""Distillation losses: one module per method, networks passed at call time, no `args`, no `Accelerator`."""

from ..models.denoiser import (
    PREDICTION_TYPES,
    Denoiser,
    DenoiserOutput,
    alpha_sigma,
    classifier_free_guidance,
    to_x0_eps,
)
from .act import ACTLoss, adversarial_weights, ct_bins, ct_ema_decay, karras_sigmas, pseudo_huber
from .consistency import ConsistencyTuningLoss, consistency_function, ect_r, sigma_to_timestep
from .generator import INPUT_TYPES, student_generate, student_input
from .sid import SiDLoss
from .vsd import PGSwiftBrushLoss, clamped_clip_loss


__all__ = [
    "ACTLoss",
    "ConsistencyTuningLoss",
    "INPUT_TYPES",
    "PREDICTION_TYPES",
    "Denoiser",
    "DenoiserOutput",
    "PGSwiftBrushLoss",
    "SiDLoss",
    "alpha_sigma",
    "clamped_clip_loss",
    "adversarial_weights",
    "classifier_free_guidance",
    "consistency_function",
    "ct_bins",
    "ct_ema_decay",
    "ect_r",
    "karras_sigmas",
    "pseudo_huber",
    "sigma_to_timestep",
    "student_generate",
    "student_input",
    "to_x0_eps",
]
