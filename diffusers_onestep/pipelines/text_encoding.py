"""Prompt encoding as pure functions, shared by the pipelines and the training scripts.

`encode_prompt` reproduces `StableDiffusionPipeline.encode_prompt` for one branch (positive or negative): CLIP
tokenization padded to `model_max_length`, the attention mask only where the text encoder's config asks for it, and
`clip_skip` through the final layer norm.
"""

from __future__ import annotations

import torch
from diffusers.utils import logging


__all__ = ["encode_prompt", "repeat_embeddings", "tokenize_prompt"]

logger = logging.get_logger(__name__)


def tokenize_prompt(
    tokenizer, prompt: str | list[str], max_length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    Tokenizes `prompt` to a fixed length, warning when text is truncated.

    Returns:
        `(input_ids, attention_mask)`, both `(batch, max_length)` long tensors.
    """
    prompt = [prompt] if isinstance(prompt, str) else list(prompt)
    max_length = max_length or tokenizer.model_max_length
    text_inputs = tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    untruncated_ids = tokenizer(prompt, padding="longest", return_tensors="pt").input_ids
    if untruncated_ids.shape[-1] > text_inputs.input_ids.shape[-1]:
        # one short line whatever the prompt's length: how much was cut, and where the cut text starts
        removed = untruncated_ids.shape[-1] - text_inputs.input_ids.shape[-1]
        start = tokenizer.decode(untruncated_ids[0, max_length - 1 : max_length + 9], skip_special_tokens=True)
        start = start if len(start) <= 60 else start[:57] + "..."
        logger.warning(f"A prompt was truncated to {max_length} tokens ({removed} tokens cut, from {start!r}...).")
    return text_inputs.input_ids, text_inputs.attention_mask


def encode_prompt(
    tokenizer,
    text_encoder,
    prompt: str | list[str],
    device: torch.device | str | None = None,
    num_images_per_prompt: int = 1,
    clip_skip: int | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    r"""
    Encodes `prompt` with a CLIP text encoder, exactly as `StableDiffusionPipeline.encode_prompt` does for one branch.

    Args:
        tokenizer (`CLIPTokenizer`): the tokenizer.
        text_encoder (`CLIPTextModel`): the text encoder.
        prompt (`str` or `list[str]`): the prompt(s); `""` gives the unconditional embedding.
        device (`torch.device`, *optional*): where the embeddings go; defaults to the text encoder's device.
        num_images_per_prompt (`int`, defaults to 1): each embedding is repeated this many times, consecutively.
        clip_skip (`int`, *optional*): number of final CLIP layers to skip (1 = the penultimate layer's output).
        dtype (`torch.dtype`, *optional*): output dtype; defaults to the text encoder's.

    Returns:
        `torch.Tensor` of shape `(batch * num_images_per_prompt, max_length, hidden_size)`.
    """
    device = device if device is not None else text_encoder.device
    input_ids, attention_mask = tokenize_prompt(tokenizer, prompt)
    input_ids = input_ids.to(text_encoder.device)
    if not getattr(text_encoder.config, "use_attention_mask", False):
        attention_mask = None
    else:
        attention_mask = attention_mask.to(text_encoder.device)

    if clip_skip is None:
        prompt_embeds = text_encoder(input_ids, attention_mask=attention_mask)[0]
    else:
        hidden_states = text_encoder(input_ids, attention_mask=attention_mask, output_hidden_states=True)[-1]
        # the final layer norm is part of what SD's UNet was trained on, so it is applied to the earlier layer too
        # (transformers 5 flattened CLIPTextModel: `final_layer_norm` lives on the model, no more `.text_model`)
        final_layer_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
        prompt_embeds = final_layer_norm(hidden_states[-(clip_skip + 1)])

    prompt_embeds = prompt_embeds.to(dtype=dtype or text_encoder.dtype, device=device)
    return repeat_embeddings(prompt_embeds, num_images_per_prompt)


def repeat_embeddings(embeds: torch.Tensor, num_images_per_prompt: int) -> torch.Tensor:
    r"""Repeats each row of `embeds` (`(batch, ...)`) `num_images_per_prompt` times, consecutively."""
    if num_images_per_prompt == 1:
        return embeds
    return embeds.repeat_interleave(num_images_per_prompt, dim=0)
