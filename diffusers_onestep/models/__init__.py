"""The bottom floor: VP math and network adapters, imported by schedulers, pipelines and losses (importing none)."""

from .backbones import (
    BACKBONES,
    BackboneAdapter,
    PixArtTransformerAdapter,
    SDUNetAdapter,
    SDXLUNetAdapter,
    backbone_for,
    cat_conditioning,
    repeat_conditioning,
    slice_conditioning,
)
from .denoiser import (
    INPUT_TYPES,
    PREDICTION_TYPES,
    Denoiser,
    DenoiserOutput,
    alpha_sigma,
    classifier_free_guidance,
    consistency_function,
    sigma_to_timestep,
    student_input,
    to_x0_eps,
)
from .discriminator import LatentDiscriminator, pooled_text


__all__ = [
    "BACKBONES",
    "BackboneAdapter",
    "PixArtTransformerAdapter",
    "SDUNetAdapter",
    "SDXLUNetAdapter",
    "backbone_for",
    "cat_conditioning",
    "repeat_conditioning",
    "slice_conditioning",
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
    "LatentDiscriminator",
    "pooled_text",
]
