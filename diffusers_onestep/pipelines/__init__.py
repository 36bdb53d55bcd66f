from .pipeline_onestep import OneStepPipeline, OneStepPipelineOutput
from .text_encoding import encode_prompt, repeat_embeddings, tokenize_prompt


__all__ = ["OneStepPipeline", "OneStepPipelineOutput", "encode_prompt", "repeat_embeddings", "tokenize_prompt"]
