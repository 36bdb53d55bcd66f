"""Tiny, seeded components built in code, for tests and offline examples.

Nothing here downloads anything: the CLIP tokenizer is written from an in-memory byte-level vocabulary, so a
tokenizer, text encoder, UNet and VAE of a few thousand parameters can be made on any machine.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode


__all__ = [
    "DEFAULT_WORDS",
    "DUMMY_CALL_KWARGS",
    "build_clip_tokenizer",
    "build_t5_tokenizer",
    "get_dummy_components",
    "get_dummy_flux_components",
    "get_dummy_pipeline",
    "get_dummy_pixart_components",
    "get_dummy_sd3_components",
    "get_dummy_sdxl_components",
    "get_dummy_teacher_components",
]

DEFAULT_WORDS = (
    "a photo of the handwritten digit number zero one two three four five six seven eight nine cat dog pet"
).split()


def build_clip_tokenizer(
    words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 16, save_directory: str | os.PathLike | None = None
) -> CLIPTokenizer:
    r"""
    Builds a byte-level BPE `CLIPTokenizer` whose vocabulary is every byte (alone and word-final) plus one merge chain
    per word in `words`, so those words are single tokens and any other text still tokenizes character by character.

    Args:
        words (`Iterable[str]`): words that become single tokens (lower-cased, as CLIP lower-cases its input).
        model_max_length (`int`, defaults to 16): the padded sequence length.
        save_directory (`str`, *optional*): when given, the tokenizer is also saved there.
    """
    byte_chars = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for char in byte_chars:
            vocab[char + suffix] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(w.lower() for w in words):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            merged = pieces[0] + pieces[1]
            if pair not in merges and merged not in vocab:
                merges.append(pair)
                vocab[merged] = len(vocab)
            pieces = [merged] + pieces[2:]
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    if save_directory is not None:
        tokenizer.save_pretrained(save_directory)
    return tokenizer


def get_dummy_components(
    seed: int = 0,
    sample_size: int = 16,
    cross_attention_dim: int = 32,
    prediction_type: str = "epsilon",
    latent_channels: int = 4,
) -> dict:
    r"""
    The components of a tiny Stable-Diffusion-like model (diffusers' `get_dummy_components` sizes): a UNet with
    `block_out_channels=(4, 8)`, a one-level VAE whose scale factor is 2, a two-layer CLIP text encoder and a byte-level
    tokenizer, and a `DDPMScheduler` with Stable Diffusion's `scaled_linear` betas. Seeded: equal seeds give equal
    weights.

    Returns:
        `dict` with keys `unet`, `vae`, `text_encoder`, `tokenizer`, `scheduler`.
    """
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=sample_size // 2,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=2,
        attention_head_dim=2,
    )
    vae = _tiny_vae(seed, sample_size, latent_channels)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=cross_attention_dim,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=1100,
            max_position_embeddings=16,
        )
    ).eval()
    tokenizer = build_clip_tokenizer()
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        clip_sample=False,
        steps_offset=1,
    )
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def get_dummy_teacher_components(seed: int = 0, **kwargs) -> dict:
    r"""The components of a tiny `StableDiffusionPipeline` (safety checker and feature extractor off)."""
    components = get_dummy_components(seed=seed, **kwargs)
    components.update(safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    return components


def _tiny_vae(seed: int, sample_size: int, latent_channels: int = 4) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(4, 8),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        norm_num_groups=2,
        sample_size=sample_size,
    )


def _tiny_clip_config(hidden_size: int, projection_dim: int | None = None) -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden_size, intermediate_size=37,
        layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2, vocab_size=1100, max_position_embeddings=16,
        hidden_act="gelu", **({"projection_dim": projection_dim} if projection_dim else {}),
    )  # fmt: skip


def get_dummy_sdxl_components(seed: int = 0, sample_size: int = 16) -> dict:
    r"""
    The components of a tiny `StableDiffusionXLPipeline` after diffusers' SDXL fast tests: two CLIP text encoders of
    width 16 (the second with a 16-wide projection), a UNet with `addition_embed_type="text_time"` whose
    `cross_attention_dim` is their concatenated width (32), the shared tiny VAE, two byte-level tokenizers.
    """
    time_embed_dim, text_dim = 8, 16
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=sample_size // 2, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 2), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * time_embed_dim + text_dim, cross_attention_dim=2 * text_dim,
        norm_num_groups=2,
    )  # fmt: skip
    vae = _tiny_vae(seed, sample_size)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_tiny_clip_config(text_dim)).eval()
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_clip_config(text_dim, projection_dim=text_dim)).eval()
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              steps_offset=1)  # fmt: skip
    return {
        "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2, "tokenizer": build_clip_tokenizer(),
        "tokenizer_2": build_clip_tokenizer(), "unet": unet, "scheduler": scheduler,
    }  # fmt: skip


def build_t5_tokenizer(
    words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 16, save_directory: str | os.PathLike | None = None
) -> T5Tokenizer:
    r"""
    A unigram `T5Tokenizer` written in code: one piece per word in `words` (`▁word`) plus every lower-case letter and
    digit, so any text tokenizes. `<pad>` = 0, `</s>` = 1, `<unk>` = 2, as in T5.
    """
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w.lower(), -1.0) for w in dict.fromkeys(words)]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789\u2581"]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)
    if save_directory is not None:
        tokenizer.save_pretrained(save_directory)
    return tokenizer


def get_dummy_pixart_components(seed: int = 0, sample_size: int = 16, learned_sigma: bool = True) -> dict:
    r"""
    The components of a tiny `PixArtAlphaPipeline` after diffusers' PixArt fast tests: a 2-layer
    `PixArtTransformer2DModel` (patch 2, `caption_channels=32`, learned sigma: `out_channels = 2 x in_channels`), a
    tiny T5 encoder of width 32, the local unigram T5 tokenizer, the shared tiny VAE and a DPM-Solver++ scheduler.
    """
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=sample_size // 2, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
        caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8 if learned_sigma else 4,
        attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6,
    )  # fmt: skip
    vae = _tiny_vae(seed, sample_size)
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(
        T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, pad_token_id=0,
                 eos_token_id=1, decoder_start_token_id=0)  # fmt: skip
    ).eval()
    scheduler = DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
    return {"tokenizer": build_t5_tokenizer(), "text_encoder": text_encoder, "vae": vae, "transformer": transformer,
            "scheduler": scheduler}  # fmt: skip


def _tiny_t5(seed: int, d_model: int = 32) -> T5EncoderModel:
    torch.manual_seed(seed)
    return T5EncoderModel(
        T5Config(vocab_size=64, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4, pad_token_id=0,
                 eos_token_id=1, decoder_start_token_id=0)  # fmt: skip
    ).eval()


def get_dummy_sd3_components(seed: int = 0, sample_size: int = 16) -> dict:
    r"""
    The components of a tiny `StableDiffusion3Pipeline` after diffusers' SD3 fast tests: a one-layer
    `SD3Transformer2DModel` (patch 1, 4 heads of 8, joint attention width 32, pooled width 64), two CLIP text encoders
    with projections of width 32, the tiny T5 encoder, three local tokenizers, a flow-matching Euler scheduler and the
    shared tiny VAE (`shift_factor` 0, as SD3's decoding needs one).
    """
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size // 2, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64,
        out_channels=4,
    )  # fmt: skip
    vae = _tiny_vae(seed, sample_size)
    vae.register_to_config(shift_factor=0.0)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(_tiny_clip_config(32, projection_dim=32)).eval()
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_clip_config(32, projection_dim=32)).eval()
    return {
        "transformer": transformer, "vae": vae, "scheduler": FlowMatchEulerDiscreteScheduler(),
        "text_encoder": text_encoder, "text_encoder_2": text_encoder_2, "text_encoder_3": _tiny_t5(seed),
        "tokenizer": build_clip_tokenizer(), "tokenizer_2": build_clip_tokenizer(), "tokenizer_3": build_t5_tokenizer(),
        "image_encoder": None, "feature_extractor": None,
    }  # fmt: skip


def get_dummy_flux_components(seed: int = 0, sample_size: int = 16) -> dict:
    r"""
    The components of a tiny `FluxPipeline` after diffusers' Flux fast tests: a `FluxTransformer2DModel` with one
    double- and one single-stream block (2 heads of 16, rotary axes (4, 4, 8)), a CLIP text encoder (pooled width 32),
    the tiny T5 encoder, local tokenizers, a flow-matching Euler scheduler and a one-channel tiny VAE (Flux packs 2x2
    latent patches into 4 channels).
    """
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    )  # fmt: skip
    vae = _tiny_vae(seed, sample_size, latent_channels=1)
    vae.register_to_config(shift_factor=0.0609, scaling_factor=1.5035)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_tiny_clip_config(32)).eval()
    return {
        "transformer": transformer, "vae": vae, "scheduler": FlowMatchEulerDiscreteScheduler(),
        "text_encoder": text_encoder, "text_encoder_2": _tiny_t5(seed), "tokenizer": build_clip_tokenizer(),
        "tokenizer_2": build_t5_tokenizer(), "image_encoder": None, "feature_extractor": None,
    }  # fmt: skip


# call arguments a tiny pipeline of each family needs: PixArt's bins start at 256 px and its caption cleaning needs bs4
DUMMY_CALL_KWARGS = {
    "sd": {}, "sdxl": {}, "pixart": {"max_sequence_length": 16, "use_resolution_binning": False, "clean_caption": False},
    "sd3": {"max_sequence_length": 16}, "flux": {"max_sequence_length": 16},
}  # fmt: skip


def get_dummy_pipeline(family: str, seed: int = 0):
    r"""
    A tiny diffusers pipeline of `family` (`"sd"`, `"sdxl"`, `"pixart"`, `"sd3"`, `"flux"`) from this module's
    components; `DUMMY_CALL_KWARGS[family]` are the call arguments its size needs.
    """
    from diffusers import (
        FluxPipeline,
        PixArtAlphaPipeline,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    builders = {
        "sd": lambda: StableDiffusionPipeline(**get_dummy_teacher_components(seed)),
        "sdxl": lambda: StableDiffusionXLPipeline(**get_dummy_sdxl_components(seed)),
        "pixart": lambda: PixArtAlphaPipeline(**get_dummy_pixart_components(seed)),
        "sd3": lambda: StableDiffusion3Pipeline(**get_dummy_sd3_components(seed)),
        "flux": lambda: FluxPipeline(**get_dummy_flux_components(seed)),
    }
    if family not in builders:
        raise ValueError(f"`family` must be one of {sorted(builders)}, got {family!r}.")
    return builders[family]()
