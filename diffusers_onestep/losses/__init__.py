"""Distillation losses: one module per method, networks passed at call time, no `args`, no `Accelerator`."""

from ..models.denoiser import (
    PREDICTION_TYPES,
    Denoiser,
    DenoiserOutput,
    alpha_sigma,
    classifier_free_guidance,
    to_x0_eps,
)
from .consistency import ConsistencyTuningLoss, consistency_function, ect_r, sigma_to_timestep
from .generator import INPUT_TYPES, student_generate, student_input
from .sid import SiDLoss
from .vsd import PGSwiftBrushLoss, clamped_clip_loss


__all__ = [
    "ConsistencyTuningLoss",
    "INPUT_TYPES",
    "PREDICTION_TYPES",
    "Denoiser",
    "DenoiserOutput",
    "PGSwiftBrushLoss",
    "SiDLoss",
    "alpha_sigma",
    "clamped_clip_loss",
    "classifier_free_guidance",
    "consistency_function",
    "ect_r",
    "sigma_to_timestep",
    "student_generate",
    "student_input",
    "to_x0_eps",
]
