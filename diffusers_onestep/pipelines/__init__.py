from .calibration import OracleCalibration
from .oracles import CallableOracle, CLIPScoreOracle, ImageRewardOracle, Oracle
from .pipeline_adaptive_collab import AdaptiveCollabPipeline, AdaptiveCollabPipelineOutput
from .pipeline_onestep import OneStepPipeline, OneStepPipelineOutput
from .pipeline_onestep_pixart import OneStepPixArtPipeline
from .pipeline_onestep_xl import OneStepXLPipeline
from .text_encoding import encode_prompt, repeat_embeddings, tokenize_prompt


__all__ = [
    "AdaptiveCollabPipeline",
    "AdaptiveCollabPipelineOutput",
    "CLIPScoreOracle",
    "CallableOracle",
    "ImageRewardOracle",
    "OneStepPipeline",
    "OneStepPipelineOutput",
    "OneStepPixArtPipeline",
    "OneStepXLPipeline",
    "Oracle",
    "OracleCalibration",
    "encode_prompt",
    "repeat_embeddings",
    "tokenize_prompt",
]
