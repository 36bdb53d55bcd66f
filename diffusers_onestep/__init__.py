"""diffusers-onestep: one-step text-to-image for Hugging Face diffusers.

Every component is imported eagerly: diffusers resolves a `["diffusers_onestep", "<Class>"]` entry of a
`model_index.json` only when `diffusers_onestep` is already imported.
"""

__version__ = "0.1.0.dev0"

from .attention import NASAAttnProcessor, nasa_attention
from .pipelines import (
    AdaptiveCollabPipeline,
    AdaptiveCollabPipelineOutput,
    CallableOracle,
    CLIPScoreOracle,
    ImageRewardOracle,
    OneStepPipeline,
    OneStepPipelineOutput,
    Oracle,
)
from .schedulers import ConsistencyStudentScheduler, ConsistencyStudentSchedulerOutput


__all__ = [
    "AdaptiveCollabPipeline",
    "AdaptiveCollabPipelineOutput",
    "CLIPScoreOracle",
    "CallableOracle",
    "ConsistencyStudentScheduler",
    "ConsistencyStudentSchedulerOutput",
    "ImageRewardOracle",
    "NASAAttnProcessor",
    "OneStepPipeline",
    "OneStepPipelineOutput",
    "Oracle",
    "__version__",
    "nasa_attention",
]
