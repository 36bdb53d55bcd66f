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

from .guidance import NASAGuidance, NegativeGuidance


__all__ = ["NASAAttnProcessor", "NegativeAttnProcessor", "check_nasa_scale", "nasa_attention", "negative_processor"]

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


class NegativeAttnProcessor:
    r"""
    Cross-attention processor for an attention-space negative guidance (`guidance.combine(Z+, Z-)` before `to_out`):
    NASA (`NASAGuidance`, SNOOPI Eq. 7) or NAG (`NAGGuidance`, arXiv 2505.21179).

    A drop-in for diffusers' `AttnProcessor2_0`. On self-attention layers, with an identity guidance (scale 0), outside
    the guidance's `end` fraction, or without a negative it returns exactly what `base_processor` returns. When
    `base_processor` is another processor (an IP-Adapter processor, say), it is wrapped: its output is kept and
    `W_out (combine(Z+, Z-) - Z+)` (the output projection's linear part) is added, which equals replacing `Z+` because
    `to_out[0]` is affine (exact in eval mode; with attention dropout active the two differ by the dropout). For NASA
    that correction is `-alpha W_out Z-` (one extra attention); NAG also recomputes `Z+` (two).

    The negative comes from the constructor's tensors or, when `source` is given, from `source.negative` /
    `source.negative_mask` / `source.fraction` at every call (how `diffusers_onestep.nasa` binds one negative to all
    layers and updates it per network call, e.g. after PixArt's caption projection).
    """

    def __init__(
        self,
        guidance: NegativeGuidance,
        base_processor=None,
        negative_encoder_hidden_states: torch.Tensor | None = None,
        negative_attention_mask: torch.Tensor | None = None,
        source=None,
    ):
        self.guidance = guidance
        self.base_processor = base_processor if base_processor is not None else AttnProcessor2_0()
        self.negative_encoder_hidden_states = negative_encoder_hidden_states
        self.negative_attention_mask = negative_attention_mask
        self.source = source

    def _guidance_for_call(self, nasa_scale) -> NegativeGuidance:
        return self.guidance

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
        fraction = None
        if negative_encoder_hidden_states is None:
            if self.source is not None:
                negative_encoder_hidden_states = self.source.negative
                negative_attention_mask = self.source.negative_mask
                fraction = self.source.fraction
            else:
                negative_encoder_hidden_states = self.negative_encoder_hidden_states
                negative_attention_mask = self.negative_attention_mask
        guidance = self._guidance_for_call(nasa_scale)
        if (encoder_hidden_states is None or negative_encoder_hidden_states is None or guidance.is_identity
                or not guidance.active_at(fraction)):  # fmt: skip
            return self.base_processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)

        batch_size = hidden_states.shape[0]
        negative = _match_batch(negative_encoder_hidden_states, batch_size, "negative_encoder_hidden_states")
        negative = negative.to(device=hidden_states.device, dtype=hidden_states.dtype)
        negative_mask = _match_batch(
            _mask_to_bias(negative_attention_mask, hidden_states.dtype), batch_size, "negative_attention_mask"
        )
        if type(self.base_processor) not in (AttnProcessor2_0, AttnProcessor):
            return self._wrap(attn, hidden_states, encoder_hidden_states, attention_mask, temb, negative,
                              negative_mask, guidance, **kwargs)  # fmt: skip

        # 1. Queries from the image tokens, exactly as the stock processor computes them.
        residual = hidden_states
        query, layout = _query(attn, hidden_states, temb)
        # 2. Z+ and Z- through the same K/V projections, each with its own mask.
        z_pos = _merge_heads(_project_attention(attn, query, encoder_hidden_states, attention_mask))
        z_neg = _merge_heads(_project_attention(attn, query, negative, negative_mask))
        # 3. The guidance, before the output projection (NASA: Z+ - alpha Z-).
        hidden_states = guidance.combine(z_pos, z_neg).to(query.dtype)
        # 4. Output projection, dropout, residual and rescale as in AttnProcessor2_0.
        hidden_states = _to_input_layout(attn.to_out[1](attn.to_out[0](hidden_states)), layout)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _wrap(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, negative, negative_mask,
              guidance, **kwargs) -> torch.Tensor:  # fmt: skip
        """Guidance around a foreign processor: its output plus `W_out (combine(Z+, Z-) - Z+)`."""
        output = self.base_processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        query, layout = _query(attn, hidden_states, temb)
        z_neg = _merge_heads(_project_attention(attn, query, negative, negative_mask)).to(query.dtype)
        if isinstance(guidance, NASAGuidance):  # combine - Z+ = -alpha Z-: no second attention needed
            delta = guidance.combine(torch.zeros_like(z_neg), z_neg)
        else:
            z_pos = _merge_heads(_project_attention(attn, query, encoder_hidden_states, attention_mask))
            delta = guidance.combine(z_pos, z_neg).to(query.dtype) - z_pos
        projected = attn.to_out[0](delta) - attn.to_out[0](torch.zeros_like(delta[:, :1]))
        return output + _to_input_layout(projected, layout) / attn.rescale_output_factor


class NASAAttnProcessor(NegativeAttnProcessor):
    r"""
    Attention processor for Negative-Away Steer Attention (SNOOPI, Eq. 7): `Z = Z+ - scale * Z-` before `to_out`
    (`NegativeAttnProcessor` with `NASAGuidance(scale)`).

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
        source (*optional*): an object whose `negative`, `negative_mask` and `fraction` are read at every call.
        end (`float`, defaults to 1.0): the guided fraction of the trajectory (`NegativeGuidance.end`).
    """

    def __init__(
        self,
        scale: float | torch.Tensor = 0.1,
        base_processor=None,
        negative_encoder_hidden_states: torch.Tensor | None = None,
        negative_attention_mask: torch.Tensor | None = None,
        source=None,
        end: float = 1.0,
    ):
        check_nasa_scale(scale, "scale")
        super().__init__(NASAGuidance(scale=scale, end=end), base_processor, negative_encoder_hidden_states,
                         negative_attention_mask, source)  # fmt: skip

    @property
    def scale(self):
        return self.guidance.scale

    def _guidance_for_call(self, nasa_scale) -> NegativeGuidance:
        return self.guidance if nasa_scale is None else NASAGuidance(scale=nasa_scale, end=self.guidance.end)


def negative_processor(guidance: NegativeGuidance, base_processor=None, negative=None, negative_mask=None,
                       source=None) -> NegativeAttnProcessor:  # fmt: skip
    r"""The processor of `guidance` around `base_processor`: a `NASAAttnProcessor` for NASA, else the generic one."""
    if isinstance(guidance, NASAGuidance):
        return NASAAttnProcessor(guidance.scale, base_processor, negative, negative_mask, source, end=guidance.end)
    return NegativeAttnProcessor(guidance, base_processor, negative, negative_mask, source)


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
    guidance: NegativeGuidance | None = None,
):
    r"""
    Context manager that gives every cross-attention layer of `model` a `NASAAttnProcessor` (or, with `guidance`, a
    `NegativeAttnProcessor` of that guidance, e.g. `NAGGuidance`) bound to the negative
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
        guidance (`NegativeGuidance`, *optional*): another guidance than NASA at `scale` (then `scale` is unused).

    Example:

    ```py
    >>> with nasa_attention(pipe.unet, negative_prompt_embeds, scale=0.2):
    ...     noise_pred = pipe.unet(latents, t, encoder_hidden_states=prompt_embeds).sample
    ```
    """
    if guidance is None:
        check_nasa_scale(scale, "scale")
        guidance = NASAGuidance(scale=scale)
    if negative_encoder_hidden_states is None or guidance.is_identity:
        yield model
        return
    originals = [(module, module.processor) for module in _cross_attention_modules(model)]
    if not originals:
        raise ValueError(
            f"`model` ({type(model).__name__}) has no cross-attention layers: NASA needs text conditioning."
        )
    try:
        for module, processor in originals:
            base = processor.base_processor if isinstance(processor, NegativeAttnProcessor) else processor
            module.set_processor(
                negative_processor(guidance, base, negative_encoder_hidden_states, negative_attention_mask)
            )
        yield model
    finally:
        for module, processor in originals:
            module.set_processor(processor)
