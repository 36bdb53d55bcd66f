"""diffusers-onestep: one-step text-to-image for Hugging Face diffusers.

Every component is imported eagerly: diffusers resolves our entries of a `model_index.json` only when
`diffusers_onestep` is already imported. The import also registers our pipelines with diffusers' generic loaders
(`pipelines.loading.register_with_diffusers`), so `DiffusionPipeline.from_pretrained(dir)` and
`AutoPipelineForText2Image.from_pretrained(dir or Hub id)` return them.
"""

__version__ = "0.1.0.dev0"

from . import _logging  # noqa: F401  (first: before anything imports diffusers)
from .attention import NAGGuidance, NASAAttnProcessor, NASAGuidance, NegativeAttnProcessor, nasa, nasa_attention
from .pipelines import (
    AdaptiveCollabPipeline,
    AdaptiveCollabPipelineOutput,
    CallableOracle,
    CLIPScoreOracle,
    ImageRewardOracle,
    OneStepPipeline,
    OneStepPipelineOutput,
    OneStepPixArtPipeline,
    OneStepXLPipeline,
    Oracle,
    OracleCalibration,
)
from .pipelines.loading import register_with_diffusers
from .schedulers import ConsistencyStudentScheduler, ConsistencyStudentSchedulerOutput


register_with_diffusers(
    OneStepPipeline,
    OneStepXLPipeline,
    OneStepPixArtPipeline,
    auto_names={"onestep": "OneStepPipeline", "onestep-xl": "OneStepXLPipeline", "onestep-pixart": "OneStepPixArtPipeline"},
)


__all__ = [
    "AdaptiveCollabPipeline",
    "AdaptiveCollabPipelineOutput",
    "CLIPScoreOracle",
    "CallableOracle",
    "ConsistencyStudentScheduler",
    "ConsistencyStudentSchedulerOutput",
    "ImageRewardOracle",
    "NAGGuidance",
    "NASAAttnProcessor",
    "NASAGuidance",
    "NegativeAttnProcessor",
    "OneStepPipeline",
    "OneStepPipelineOutput",
    "OneStepPixArtPipeline",
    "OneStepXLPipeline",
    "Oracle",
    "OracleCalibration",
    "__version__",
    "nasa",
    "nasa_attention",
]
