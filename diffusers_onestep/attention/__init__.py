from .context import nasa, pipeline_family
from .guidance import NAG_DEFAULTS, NAGGuidance, NASAGuidance, NegativeGuidance, nasa_as_nag_extrapolation
from .joint import FluxNegativeAttnProcessor, JointNegativeAttnProcessor
from .nasa import NASAAttnProcessor, NegativeAttnProcessor, check_nasa_scale, nasa_attention


__all__ = [
    "FluxNegativeAttnProcessor",
    "JointNegativeAttnProcessor",
    "NAGGuidance",
    "NAG_DEFAULTS",
    "NASAAttnProcessor",
    "NASAGuidance",
    "NegativeAttnProcessor",
    "NegativeGuidance",
    "check_nasa_scale",
    "nasa",
    "nasa_as_nag_extrapolation",
    "nasa_attention",
    "pipeline_family",
]
