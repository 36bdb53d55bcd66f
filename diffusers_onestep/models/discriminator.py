"""ACT's discriminator, in latent space and conditioned on text: a UNet encoder with one logit.

Kong et al., "ACT: Adversarial Consistency Training for One-step Diffusion Models" (CVPR 2024; official code
`kong13661/ACT`, `models/discriminator_cifar10.py` / `discriminator_imagenet.py`): `conv_in`, diffusers down blocks
(ResNet blocks with an additive time embedding, self-attention where configured), `UNetMidBlock2D`, GroupNorm, SiLU,
`AdaptiveAvgPool2d(2)`, flatten, `Linear(4 C, 1)`; a separate network (no features shared with the generator),
randomly initialised, conditioned on the noise level through the same sinusoidal + MLP embedding the generator uses.
Adapted here: it sees latents (clean-space: real `x0` latents, fake `f(x_t, t)`), the noise level is the VP timestep
(fractional), and ImageNet's class embedding becomes a linear projection of the pooled text embedding added to the
time embedding (`pooled_text`: SDXL's `text_embeds`, else the mean of the prompt's token embeddings over its mask).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention_processor import Attention, AttnProcessor
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, get_down_block


__all__ = ["LatentDiscriminator", "pooled_text"]


def pooled_text(cond: dict) -> torch.Tensor:
    r"""`(batch, D)`: SDXL's pooled `text_embeds`, else the masked mean of `encoder_hidden_states` over tokens."""
    if "text_embeds" in cond:
        return cond["text_embeds"].float()
    hidden = cond["encoder_hidden_states"].float()
    mask = cond.get("encoder_attention_mask")
    if mask is None:
        return hidden.mean(dim=1)
    mask = mask.to(hidden.dtype).reshape(hidden.shape[0], -1, 1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


class LatentDiscriminator(ModelMixin, ConfigMixin):
    r"""
    `D(x, t, c) -> (batch,)` logits for latents `x` `(batch, in_channels, H, W)`, timesteps `t` `(batch,)` (floats
    allowed) and pooled text embeddings `c` `(batch, text_embed_dim)`.

    Args:
        in_channels (`int`): latent channels.
        text_embed_dim (`int`): width of `pooled_text`.
        block_out_channels (`tuple[int, ...]`): channels per level (ACT CIFAR: 128, 256, 256, 256).
        down_block_types (`tuple[str, ...]`, *optional*): diffusers down blocks without cross-attention
            (`"DownBlock2D"`, `"AttnDownBlock2D"`); default: attention at the last level only.
        layers_per_block (`int`): ResNet blocks per level (ACT: 3).
        attention_head_dim (`int`): head width of the self-attention layers (ACT CIFAR: 8).
        norm_num_groups (`int`): GroupNorm groups (channels must be multiples of it).
    """

    @register_to_config
    def __init__(
        self, in_channels: int = 4, text_embed_dim: int = 768, block_out_channels: tuple[int, ...] = (128, 256, 256),
        down_block_types: tuple[str, ...] | None = None, layers_per_block: int = 2, attention_head_dim: int = 8,
        norm_num_groups: int = 32,
    ):  # fmt: skip
        super().__init__()
        blocks = list(down_block_types or ["DownBlock2D"] * (len(block_out_channels) - 1) + ["AttnDownBlock2D"])
        if len(blocks) != len(block_out_channels):
            raise ValueError(f"`down_block_types` ({len(blocks)}) and `block_out_channels` must have equal lengths.")
        width, temb = block_out_channels[0], 4 * block_out_channels[0]
        self.conv_in = torch.nn.Conv2d(in_channels, width, kernel_size=3, padding=1)
        self.time_proj = Timesteps(width, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(width, temb)
        self.text_embedding = torch.nn.Linear(text_embed_dim, temb)
        self.down_blocks = torch.nn.ModuleList()
        for i, (kind, out) in enumerate(zip(blocks, block_out_channels)):
            self.down_blocks.append(get_down_block(
                kind, num_layers=layers_per_block, in_channels=width, out_channels=out, temb_channels=temb,
                add_downsample=i < len(blocks) - 1, resnet_eps=1e-5, resnet_act_fn="silu", resnet_groups=norm_num_groups,
                attention_head_dim=attention_head_dim, downsample_padding=1,
            ))  # fmt: skip
            width = out
        self.mid_block = UNetMidBlock2D(in_channels=width, temb_channels=temb, resnet_eps=1e-5, resnet_act_fn="silu",
                                        resnet_groups=norm_num_groups, attention_head_dim=attention_head_dim)  # fmt: skip
        self.norm_out = torch.nn.GroupNorm(norm_num_groups, width)
        self.pool = torch.nn.AdaptiveAvgPool2d(2)
        self.to_logit = torch.nn.Linear(4 * width, 1)
        for module in self.modules():  # R1 differentiates D twice: the plain processor (as ACT), not SDPA kernels
            if isinstance(module, Attention):
                module.set_processor(AttnProcessor())

    @classmethod
    def for_network(
        cls, network: torch.nn.Module, text_embed_dim: int, latent_size: int | None = None, **overrides
    ) -> LatentDiscriminator:
        r"""
        A discriminator mirroring a teacher UNet's encoder (its channels, levels and layers; a cross-attention block
        becomes a self-attention block where its input is at most 16 latent pixels wide, as ACT puts attention at
        16x16 only; `latent_size` defaults to the network's sample size), or for a transformer (PixArt) ACT's CIFAR
        widths over `in_channels`.
        """
        config = network.config
        kwargs = {"in_channels": config.in_channels, "text_embed_dim": text_embed_dim}
        if "down_block_types" in config:
            size = latent_size or config.sample_size
            kinds = ["AttnDownBlock2D" if "CrossAttn" in kind and size // 2**i <= 16 else "DownBlock2D"
                     for i, kind in enumerate(config.down_block_types)]  # fmt: skip
            kwargs.update(
                block_out_channels=tuple(config.block_out_channels), layers_per_block=config.layers_per_block,
                down_block_types=tuple(kinds), norm_num_groups=config.norm_num_groups, attention_head_dim=8,
            )  # fmt: skip
        return cls(**{**kwargs, **overrides})

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        timestep = torch.as_tensor(timestep, device=sample.device).float().expand(sample.shape[0])
        emb = self.time_embedding(self.time_proj(timestep).to(sample.dtype))
        emb = emb + self.text_embedding(text_embeds.to(emb.dtype))
        hidden = self.conv_in(sample)
        for block in self.down_blocks:
            hidden, _ = block(hidden, emb)
        hidden = self.mid_block(hidden, emb)
        hidden = self.pool(torch.nn.functional.silu(self.norm_out(hidden)))
        return self.to_logit(hidden.flatten(1)).squeeze(1)
