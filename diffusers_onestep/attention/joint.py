"""Negative guidance (NASA or NAG) on MMDiT joint attention: SD3 joint blocks, Flux double- and single-stream blocks.

MMDiTs have no separate cross-attention: image and text tokens attend jointly. The scheme (NAG's Flux / SD3 code,
METHODS.md section 8): the negative text runs as extra batch rows, `encoder_hidden_states = cat([positive,
negative])` (`2B` rows against `B` image rows), with its own text stream and its own pooled conditioning for the text
tokens, so it evolves through the blocks as it would in a run with the negative prompt. In every joint attention the
image queries / keys / values are shared by both text rows: the image stream attends once with the positive text
and once with the negative text, `Z+` and `Z-` are its two image-token outputs, and only those are combined
(`guidance.combine(Z+, Z-)`); the text outputs stay each their own. The image stream stays one stream of `B` rows with
the positive modulation (the time + positive pooled embedding) everywhere:

- SD3 / Flux double blocks: the image-side `AdaLayerNormZero` / `SD35AdaLayerNormZeroX` and the final `norm_out` take
  the first `B` rows of `temb` (the positive rows), the text-side norms take all `2B` (a forward pre-hook);
- Flux single blocks (one sequence `[text; image]`): the image rows are duplicated into the negative rows at the block
  entry, their normalised tokens are the positive rows' (a hook on the block's norm), the image-token attention
  outputs of the positive rows are combined, and only the positive rows' image tokens leave the block. (NAG's official
  code lets the duplicated image rows drift under the negative rows' modulation inside the single blocks; here they
  are the positive image stream exactly, the procedure METHODS.md states.)

Cost per joint layer: one extra attention over `[negative text; image]`, the negative text's projections and its
text-stream MLPs (`B x text_tokens` more rows); the image stream is computed once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections

from .guidance import NegativeGuidance


__all__ = ["FluxNegativeAttnProcessor", "JointNegativeAttnProcessor"]


def _combine_rows(guidance: NegativeGuidance, image: torch.Tensor, batch: int) -> torch.Tensor:
    """`(2B, N, D)` image outputs (positive rows first) -> `(B, N, D)` combined."""
    return guidance.combine(image[:batch], image[batch:]).to(image.dtype)


class JointNegativeAttnProcessor:
    r"""
    SD3's `JointAttnProcessor2_0` with the negative text as extra rows: called with `B` image rows and `2B` text rows
    (positive, negative) it returns the combined `B` image rows and `2B` text rows; otherwise it is the stock
    processor. `source.active` says whether this network call is guided.
    """

    def __init__(self, guidance: NegativeGuidance, source, base_processor=None):
        self.guidance = guidance
        self.source = source
        self.base_processor = base_processor if base_processor is not None else JointAttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        batch = hidden_states.shape[0]
        if encoder_hidden_states is None or encoder_hidden_states.shape[0] != 2 * batch:
            return self.base_processor(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        heads, image_tokens = attn.heads, hidden_states.shape[1]

        def heads_of(x, norm=None):
            x = x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)
            return norm(x) if norm is not None else x

        # 1. Image projections once (B rows), shared by the positive and the negative text rows
        query = heads_of(attn.to_q(hidden_states), attn.norm_q).repeat(2, 1, 1, 1)
        key = heads_of(attn.to_k(hidden_states), attn.norm_k).repeat(2, 1, 1, 1)
        value = heads_of(attn.to_v(hidden_states)).repeat(2, 1, 1, 1)
        # 2. Text projections of both text rows, appended after the image tokens as SD3 orders them
        query = torch.cat([query, heads_of(attn.add_q_proj(encoder_hidden_states), attn.norm_added_q)], dim=2)
        key = torch.cat([key, heads_of(attn.add_k_proj(encoder_hidden_states), attn.norm_added_k)], dim=2)
        value = torch.cat([value, heads_of(attn.add_v_proj(encoder_hidden_states))], dim=2)
        # 3. One joint attention per row: [image; positive text] and [image; negative text]
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(2 * batch, -1, heads * out.shape[-1]).to(query.dtype)
        image, text = out[:, :image_tokens], out[:, image_tokens:]
        # 4. Only the image tokens are combined; each text row keeps its own output
        image = attn.to_out[1](attn.to_out[0](_combine_rows(self.guidance, image, batch)))
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        return image, text


class FluxNegativeAttnProcessor:
    r"""
    Flux's `FluxAttnProcessor` with the negative text as extra rows. Double-stream blocks: `B` image rows and `2B` text
    rows in, combined `B` image rows and `2B` text rows out. Single-stream blocks (`encoder_hidden_states=None`, one
    `[text; image]` sequence of `2B` rows): the image-token outputs of the positive rows are combined and written into
    both halves (the block keeps only the positive rows' image tokens). `source.text_tokens` is the text length.
    """

    def __init__(self, guidance: NegativeGuidance, source, base_processor=None):
        self.guidance = guidance
        self.source = source
        self.base_processor = base_processor if base_processor is not None else FluxAttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        base = self.base_processor
        if encoder_hidden_states is None:  # single-stream block
            out = base(attn, hidden_states, None, attention_mask, image_rotary_emb)
            if not self.source.active or out.shape[0] != 2 * self.source.batch:
                return out
            text_tokens, batch = self.source.text_tokens, self.source.batch
            image = _combine_rows(self.guidance, out[:, text_tokens:], batch)
            return torch.cat([out[:, :text_tokens], image.repeat(2, 1, 1)], dim=1)
        batch = hidden_states.shape[0]
        if encoder_hidden_states.shape[0] != 2 * batch:
            return base(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

        # 1. Image projections once (B rows), text projections of both text rows
        query, key, value, e_query, e_key, e_value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim))).repeat(2, 1, 1, 1)
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim))).repeat(2, 1, 1, 1)
        value = value.unflatten(-1, (-1, attn.head_dim)).repeat(2, 1, 1, 1)
        e_query = attn.norm_added_q(e_query.unflatten(-1, (-1, attn.head_dim)))
        e_key = attn.norm_added_k(e_key.unflatten(-1, (-1, attn.head_dim)))
        e_value = e_value.unflatten(-1, (-1, attn.head_dim))
        # 2. [text; image] per row, rotary embedding, one attention per row (layout: batch, tokens, heads, dim)
        query, key, value = (torch.cat(pair, dim=1) for pair in ((e_query, query), (e_key, key), (e_value, value)))
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = F.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=attention_mask
        )
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        text_tokens = encoder_hidden_states.shape[1]
        text, image = out[:, :text_tokens], out[:, text_tokens:]
        # 3. Only the image tokens are combined; each text row keeps its own output
        image = attn.to_out[1](attn.to_out[0](_combine_rows(self.guidance, image, batch).contiguous()))
        return image, attn.to_add_out(text.contiguous())
