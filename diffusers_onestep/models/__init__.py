"""The bottom floor: VP math and network adapters, imported by schedulers, pipelines and losses (importing none)."""

from .denoiser import (
    INPUT_TYPES,
    PREDICTION_TYPES,
    Denoiser,
    DenoiserOutput,
    alpha_sigma,
    classifier_free_guidance,
    student_input,
    to_x0_eps,
)


__all__ = [
    "INPUT_TYPES",
    "PREDICTION_TYPES",
    "Denoiser",
    "DenoiserOutput",
    "alpha_sigma",
    "classifier_free_guidance",
    "student_input",
    "to_x0_eps",
]
