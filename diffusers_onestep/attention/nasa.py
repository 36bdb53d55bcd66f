"""NASA: Negative-Away Steer Attention (SNOOPI, Nguyen et al., arXiv 2412.02687, Sec. 3.3 / Eq. 7).

Negative prompts for one-step models without classifier-free guidance. In every cross-attention layer the image
queries attend to the positive and the negative text features through the *same* key/value projections, and the
negative attention output is subtracted before the output projection:

    Z+ = softmax(Q K+^T / sqrt(d)) V+,   Z- = softmax(Q K-^T / sqrt(d)) V-,   Z = Z+ - alpha Z-

per head, merged to `(batch, tokens, heads * head_dim)`, then `to_out`, the residual and `rescale_output_factor` as in
diffusers' stock processor. No normalisation and no clamping (the normalised NAG variant is a different method).
Self-attention is untouched, and with `alpha = 0` or no negative the layer returns exactly what the stock processor
returns. Cost: one extra attention per cross-attention layer, versus a second UNet pass for CFG.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0


__all__ = ["NASAAttnProcessor", "check_nasa_scale", "nasa_attention"]

NASA_SCALE_RANGE = (0.0, 1.5)


def check_nasa_scale(scale: float | torch.Tensor, name: str = "nasa_scale") -> None:
    r"""Raises `ValueError` unless `scale` (float or per-sample tensor) is finite and non-negative."""
    values = torch.as_tensor(scale, dtype=torch.float32)
    if not torch.isfinite(values).all() or (values < 0).any():
        raise ValueError(
            f"`{name}` must be finite and >= 0 (the paper uses values in [{NASA_SCALE_RANGE[0]}, "
            f"{NASA_SCALE_RANGE[1]}]; 0 disables NASA), got {scale}."
        )


def _mask_to_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A `(batch, tokens)` keep-mask (1 = attend) becomes the additive `(batch, 1, tokens)` bias diffusers uses."""
    if mask is None or mask.ndim == 3:
        return mask
    return ((1.0 - mask.to(dtype)) * -10000.0).unsqueeze(1)


def _match_batch(tensor: torch.Tensor | None, batch_size: int, name: str) -> torch.Tensor | None:
    if tensor is None or tensor.shape[0] == batch_size:
        return tensor
    if tensor.shape[0] == 1:
        return tensor.expand(batch_size, *tensor.shape[1:])
    raise ValueError(f"`{name}` has batch size {tensor.shape[0]}; expected 1 or {batch_size} (the image batch).")


def _project_attention(
    attn: Attention, query: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """`softmax(Q K^T / sqrt(d)) V` with `attn`'s key/value projections; `query` is `(batch, heads, L, d)`."""
    batch_size, heads, _, head_dim = query.shape
    if attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    key = attn.to_k(context).view(batch_size, -1, heads, head_dim).transpose(1, 2)
    value = attn.to_v(context).view(batch_size, -1, heads, head_dim).transpose(1, 2)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if mask is not None:
        mask = attn.prepare_attention_mask(mask, context.shape[1], batch_size)
        mask = mask.view(batch_size, heads, -1, mask.shape[-1])
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)


def _query(attn: Attention, hidden_states: torch.Tensor, temb: torch.Tensor | None) -> tuple[torch.Tensor, tuple]:
    """The stock processor's pre-processing up to the per-head query; returns it and what restores the layout."""
    input_ndim = hidden_states.ndim
    shape = hidden_states.shape
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    if input_ndim == 4:
        hidden_states = hidden_states.view(shape[0], shape[1], shape[2] * shape[3]).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    head_dim = query.shape[-1] // attn.heads
    query = query.view(query.shape[0], -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    return query, (input_ndim, shape)


def _merge_heads(hidden_states: torch.Tensor) -> torch.Tensor:
    batch_size, heads, length, head_dim = hidden_states.shape
    return hidden_states.transpose(1, 2).reshape(batch_size, length, heads * head_dim)


def _to_input_layout(hidden_states: torch.Tensor, layout: tuple) -> torch.Tensor:
    input_ndim, shape = layout
    if input_ndim == 4:
        return hidden_states.transpose(-1, -2).reshape(shape)
    return hidden_states


class NASAAttnProcessor:
    r"""
    Attention processor for Negative-Away Steer Attention (SNOOPI, Eq. 7): `Z = Z+ - scale * Z-` before `to_out`.

    A drop-in for diffusers' `AttnProcessor2_0`. On self-attention layers, with `scale == 0`, or without a negative
    embedding it returns exactly what `base_processor` returns. When `base_processor` is another processor (an
    IP-Adapter processor, say), NASA wraps it: the base output is kept and `scale * to_out(Z-)` (without the output
    bias) is subtracted, which equals the paper's form because `to_out[0]` is affine (exact in eval mode; with
    attention dropout active during training the two differ by the dropout of `Z-`).

    Args:
        scale (`float` or `torch.Tensor`, defaults to 0.1):
            `alpha`, the weight of the negative attention; a `(batch,)` tensor gives one value per sample (NASA-T
            training). Paper defaults: 0.1 (SD1.5-like), 0.2 (SD2.1-like), 0.5 (PixArt).
        base_processor (*optional*):
            The processor NASA extends; defaults to `AttnProcessor2_0`.
        negative_encoder_hidden_states (`torch.Tensor`, *optional*):
            `(batch or 1, tokens, dim)` negative text features bound to the processor (see `nasa_attention`).
        negative_attention_mask (`torch.Tensor`, *optional*):
            `(batch, tokens)` keep-mask (1 = attend) or `(batch, 1, tokens)` additive bias for the negative tokens.
    """

    def __init__(
        self,
        scale: float | torch.Tensor = 0.1,
        base_processor=None,
        negative_encoder_hidden_states: torch.Tensor | None = None,
        negative_attention_mask: torch.Tensor | None = None,
    ):
        check_nasa_scale(scale, "scale")
        self.scale = scale
        self.base_processor = base_processor if base_processor is not None else AttnProcessor2_0()
        self.negative_encoder_hidden_states = negative_encoder_hidden_states
        self.negative_attention_mask = negative_attention_mask

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        negative_encoder_hidden_states: torch.Tensor | None = None,
        negative_attention_mask: torch.Tensor | None = None,
        nasa_scale: float | torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if negative_encoder_hidden_states is None:
            negative_encoder_hidden_states = self.negative_encoder_hidden_states
            negative_attention_mask = self.negative_attention_mask
        scale = self.scale if nasa_scale is None else nasa_scale
        is_zero = isinstance(scale, (int, float)) and scale == 0
        if encoder_hidden_states is None or negative_encoder_hidden_states is None or is_zero:
            return self.base_processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)

        batch_size = hidden_states.shape[0]
        negative = _match_batch(negative_encoder_hidden_states, batch_size, "negative_encoder_hidden_states")
        negative = negative.to(device=hidden_states.device, dtype=hidden_states.dtype)
        negative_mask = _match_batch(
            _mask_to_bias(negative_attention_mask, hidden_states.dtype), batch_size, "negative_attention_mask"
        )
        alpha = torch.as_tensor(scale, device=hidden_states.device, dtype=hidden_states.dtype)
        alpha = alpha.reshape(-1, 1, 1) if alpha.ndim == 1 else alpha

        if type(self.base_processor) not in (AttnProcessor2_0, AttnProcessor):
            return self._wrap(attn, hidden_states, encoder_hidden_states, attention_mask, temb, negative,
                              negative_mask, alpha, **kwargs)  # fmt: skip

        # 1. Queries from the image tokens, exactly as the stock processor computes them.
        residual = hidden_states
        query, layout = _query(attn, hidden_states, temb)
        # 2. Z+ and Z- through the same K/V projections, each with its own mask.
        z_pos = _merge_heads(_project_attention(attn, query, encoder_hidden_states, attention_mask))
        z_neg = _merge_heads(_project_attention(attn, query, negative, negative_mask))
        # 3. Negative-away steer, before the output projection (Eq. 7).
        hidden_states = (z_pos - alpha * z_neg).to(query.dtype)
        # 4. Output projection, dropout, residual and rescale as in AttnProcessor2_0.
        hidden_states = _to_input_layout(attn.to_out[1](attn.to_out[0](hidden_states)), layout)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _wrap(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, negative, negative_mask, alpha,
              **kwargs) -> torch.Tensor:  # fmt: skip
        """NASA around a foreign processor: base output minus `alpha * W_out Z-` (the affine map's linear part)."""
        output = self.base_processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        query, layout = _query(attn, hidden_states, temb)
        z_neg = _merge_heads(_project_attention(attn, query, negative, negative_mask)).to(query.dtype)
        projected = attn.to_out[0](z_neg) - attn.to_out[0](torch.zeros_like(z_neg[:, :1]))
        return output - _to_input_layout(alpha * projected, layout) / attn.rescale_output_factor


def _cross_attention_modules(model: torch.nn.Module) -> Iterator[Attention]:
    for module in model.modules():
        if isinstance(module, Attention) and module.is_cross_attention:
            yield module


@contextmanager
def nasa_attention(
    model: torch.nn.Module,
    negative_encoder_hidden_states: torch.Tensor | None,
    scale: float | torch.Tensor = 0.1,
    negative_attention_mask: torch.Tensor | None = None,
):
    r"""
    Context manager that gives every cross-attention layer of `model` a `NASAAttnProcessor` bound to the negative
    embeddings for the duration of the block, then puts back exactly the processors that were there.

    The negatives are bound to the processors instead of being passed through `cross_attention_kwargs` (which reach
    self-attention too and make diffusers warn on every layer), as diffusers' PAG pipelines do. Existing processors
    are wrapped, not replaced, so IP-Adapter and other custom processors keep working; an existing NASA processor is
    re-bound rather than nested. With `negative_encoder_hidden_states=None` or `scale == 0` nothing is installed.

    Args:
        model (`torch.nn.Module`): a UNet or transformer with diffusers `Attention` modules.
        negative_encoder_hidden_states (`torch.Tensor`): `(batch or 1, tokens, dim)` negative text features.
        scale (`float` or `torch.Tensor`, defaults to 0.1): NASA's `alpha`; a `(batch,)` tensor for per-sample values.
        negative_attention_mask (`torch.Tensor`, *optional*): keep-mask `(batch, tokens)` for the negative tokens.

    Example:

    ```py
    >>> with nasa_attention(pipe.unet, negative_prompt_embeds, scale=0.2):
    ...     noise_pred = pipe.unet(latents, t, encoder_hidden_states=prompt_embeds).sample
    ```
    """
    check_nasa_scale(scale, "scale")
    is_zero = isinstance(scale, (int, float)) and scale == 0
    if negative_encoder_hidden_states is None or is_zero:
        yield model
        return
    originals = [(module, module.processor) for module in _cross_attention_modules(model)]
    if not originals:
        raise ValueError(
            f"`model` ({type(model).__name__}) has no cross-attention layers: NASA needs text conditioning."
        )
    try:
        for module, processor in originals:
            base = processor.base_processor if isinstance(processor, NASAAttnProcessor) else processor
            module.set_processor(
                NASAAttnProcessor(scale, base, negative_encoder_hidden_states, negative_attention_mask)
            )
        yield model
    finally:
        for module, processor in originals:
            module.set_processor(processor)
