"""diffusers-onestep: one-step text-to-image for Hugging Face diffusers.

Every component is imported eagerly: diffusers resolves a `["diffusers_onestep", "<Class>"]` entry of a
`model_index.json` only when `diffusers_onestep` is already imported.
"""

__version__ = "0.1.0.dev0"

from .attention import NASAAttnProcessor, nasa_attention
from .pipelines import OneStepPipeline, OneStepPipelineOutput
from .schedulers import ConsistencyStudentScheduler, ConsistencyStudentSchedulerOutput


__all__ = [
    "ConsistencyStudentScheduler",
    "ConsistencyStudentSchedulerOutput",
    "NASAAttnProcessor",
    "OneStepPipeline",
    "OneStepPipelineOutput",
    "__version__",
    "nasa_attention",
]
