"""One small adapter per backbone: a conditioning dict -> the network call (k-diffusion's `extra_args` idea).

Everything above this module (the `Denoiser`, the pipelines' loops, the losses) holds the text conditioning as one
dict and never branches on the backbone:

- SD 1.x / 2.x UNet: `{"encoder_hidden_states"}`;
- SDXL UNet: `{"encoder_hidden_states", "text_embeds", "time_ids"}` (`added_cond_kwargs`: pooled text embeddings and
  the size / crop conditions);
- PixArt-α / Σ transformer: `{"encoder_hidden_states", "encoder_attention_mask"}` plus `"resolution"` /
  `"aspect_ratio"` where its config wants them; the timestep goes by keyword and the learned-sigma half of the output
  is dropped.

Each adapter also says how NASA reaches its cross-attention (`nasa_negative`): for PixArt the negative text goes
through the same caption projection as the positive one. The conditioning itself comes from the backbone's own
diffusers pipeline (`encode_prompt`), never from a copy of it.
"""

from __future__ import annotations

import torch


__all__ = [
    "BACKBONES",
    "BackboneAdapter",
    "PixArtTransformerAdapter",
    "SDUNetAdapter",
    "SDXLUNetAdapter",
    "as_conditioning",
    "backbone_for",
    "cat_conditioning",
    "expand_conditioning",
    "repeat_conditioning",
    "where_conditioning",
]


def cat_conditioning(first: dict, second: dict) -> dict:
    r"""Concatenates two conditioning dicts along the batch (CFG's `[uncond, cond]`); `None` values stay `None`."""
    return {
        key: None if first[key] is None else torch.cat([first[key], second[key]]) if torch.is_tensor(first[key])
        else first[key]
        for key in first
    }  # fmt: skip


def repeat_conditioning(cond: dict, repeats: int) -> dict:
    r"""Repeats every tensor of a conditioning dict `repeats` times per row, consecutively (`num_images_per_prompt`)."""
    if repeats == 1:
        return cond
    return {k: v.repeat_interleave(repeats, dim=0) if torch.is_tensor(v) else v for k, v in cond.items()}


def slice_conditioning(cond: dict, rows) -> dict:
    r"""The rows `rows` (a slice or index tensor) of every tensor of a conditioning dict; other values stay as they are."""
    return {k: v[rows] if torch.is_tensor(v) else v for k, v in cond.items()}


def as_conditioning(cond: torch.Tensor | dict) -> dict:
    r"""A conditioning dict; a tensor is SD's `encoder_hidden_states` (the SD 1.x / 2.x tensor path)."""
    return cond if isinstance(cond, dict) else {"encoder_hidden_states": cond}


def expand_conditioning(cond: dict, batch_size: int) -> dict:
    r"""Broadcasts a batch-1 conditioning dict (the unconditional branch) to `batch_size` rows; others stay as they are."""
    return {
        k: v.expand(batch_size, *v.shape[1:]) if torch.is_tensor(v) and v.shape[0] == 1 and batch_size != 1 else v
        for k, v in cond.items()
    }


def where_conditioning(mask: torch.Tensor, if_true: dict, if_false: dict) -> dict:
    r"""
    Row-wise choice between two conditioning dicts of equal batch size: `if_true[key]` where `mask` (`(batch,)` bool)
    is set, else `if_false[key]` (the fake score's prompt dropout). Non-tensor values are taken from `if_false`.
    """
    def choose(a, b):
        if not torch.is_tensor(b):
            return b
        return torch.where(mask.to(b.device).reshape(-1, *([1] * (b.ndim - 1))), a.to(b.dtype), b)

    return {key: choose(if_true[key], value) for key, value in if_false.items()}


class BackboneAdapter:
    r"""
    Turns `(network, x_t, t, cond)` into the network's raw output for one backbone. Subclasses set `name` and
    `network_attribute` (`"unet"` or `"transformer"`) and implement `__call__`.
    """

    name: str = ""
    network_attribute: str = "unet"

    def __call__(
        self, network, sample: torch.Tensor, timesteps: torch.Tensor, cond: dict, cross_attention_kwargs=None
    ) -> torch.Tensor:
        raise NotImplementedError

    def embed_dim(self, network) -> int:
        r"""The width of the text features the network's cross-attention expects (before any projection)."""
        return network.config.cross_attention_dim

    def nasa_negative(self, network, negative: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        r"""The negative text features and keep-mask as the cross-attention layers see them."""
        return negative["encoder_hidden_states"], negative.get("encoder_attention_mask")

    @staticmethod
    def _sample_of(output) -> torch.Tensor:
        """The prediction of a diffusers model output (`.sample`), a tuple, or a plain tensor."""
        if torch.is_tensor(output):
            return output
        return output.sample if hasattr(output, "sample") else output[0]

    @staticmethod
    def _first_half_if_learned_sigma(output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        if output.shape[1] == 2 * sample.shape[1]:
            return output.chunk(2, dim=1)[0]
        return output


class SDUNetAdapter(BackboneAdapter):
    r"""Stable Diffusion 1.x / 2.x `UNet2DConditionModel`: `unet(x, t, encoder_hidden_states)`."""

    name = "sd"

    def __call__(self, network, sample, timesteps, cond, cross_attention_kwargs=None):
        return self._sample_of(network(
            sample, timesteps, encoder_hidden_states=cond["encoder_hidden_states"],
            cross_attention_kwargs=cross_attention_kwargs,
        ))  # fmt: skip


class SDXLUNetAdapter(BackboneAdapter):
    r"""
    SDXL `UNet2DConditionModel` (`addition_embed_type="text_time"`): the pooled text embeddings (`text_embeds`) and
    the size / crop conditions (`time_ids`) go in `added_cond_kwargs`. NASA changes only the cross-attention text:
    pooled embeddings and time ids stay those of the positive prompt.
    """

    name = "sdxl"

    def __call__(self, network, sample, timesteps, cond, cross_attention_kwargs=None):
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        return self._sample_of(network(
            sample, timesteps, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added,
            cross_attention_kwargs=cross_attention_kwargs,
        ))  # fmt: skip


class PixArtTransformerAdapter(BackboneAdapter):
    r"""
    PixArt-α / Σ `PixArtTransformer2DModel`: keyword timestep, T5 attention mask, `resolution` / `aspect_ratio`
    conditions where the config uses them (`None` otherwise, as `PixArtAlphaPipeline` passes them), and the
    learned-sigma half of the output dropped.
    """

    name = "pixart"
    network_attribute = "transformer"

    def __call__(self, network, sample, timesteps, cond, cross_attention_kwargs=None):
        timesteps = torch.as_tensor(timesteps, device=sample.device).reshape(-1).expand(sample.shape[0])
        added = {"resolution": cond.get("resolution"), "aspect_ratio": cond.get("aspect_ratio")}
        output = network(
            sample, encoder_hidden_states=cond["encoder_hidden_states"],
            encoder_attention_mask=cond.get("encoder_attention_mask"), timestep=timesteps, added_cond_kwargs=added,
            cross_attention_kwargs=cross_attention_kwargs,
        )  # fmt: skip
        return self._first_half_if_learned_sigma(self._sample_of(output), sample)

    def embed_dim(self, network) -> int:
        return network.config.caption_channels

    def nasa_negative(self, network, negative):
        # the cross-attention layers see the caption projection of the T5 features, so the negative goes through it
        projected = network.caption_projection(negative["encoder_hidden_states"].to(network.dtype))
        return projected, negative.get("encoder_attention_mask")


BACKBONES: dict[str, BackboneAdapter] = {
    adapter.name: adapter for adapter in (SDUNetAdapter(), SDXLUNetAdapter(), PixArtTransformerAdapter())
}


def backbone_for(network) -> BackboneAdapter:
    r"""The adapter of a denoising network, from its class and config (an SDXL UNet has `addition_embed_type`)."""
    config = getattr(network, "config", {})
    class_name = type(network).__name__
    if class_name == "PixArtTransformer2DModel":
        return BACKBONES["pixart"]
    if class_name == "UNet2DConditionModel" or "cross_attention_dim" in config:
        return BACKBONES["sdxl" if config.get("addition_embed_type") == "text_time" else "sd"]
    raise ValueError(
        f"No backbone adapter for {class_name}: supported are UNet2DConditionModel (SD 1.x / 2.x, SDXL) and "
        "PixArtTransformer2DModel (PixArt-α / Σ)."
    )
