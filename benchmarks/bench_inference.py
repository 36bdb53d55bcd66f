"""Inference cost of the one-step pipelines, as ratios measured in one process (never timed assertions in tests).

    python benchmarks/bench_inference.py [--repeats 30] [--resolution 64] [--backbones sd,sdxl,pixart]

Builds a Stable-Diffusion-shaped model of a few million parameters in code (random weights: speed does not depend
on them) and reports, with the minimum over interleaved repeats:

- overhead: a 1-step call / the sum of its parts timed alone (prompt encoding, one UNet forward, VAE decode);
- nasa_cost: a 1-step call with a negative prompt / without (NASA: one extra attention per cross-attention layer);
  nasa_unet_cost isolates the UNet forward with NASA installed / plain;
- cfg_over_nasa: output-space CFG with the negative prompt (two UNet passes) / NASA with the same negative;
- onestep_over_sd: OneStepPipeline / StableDiffusionPipeline(num_inference_steps=1, guidance_scale=0) on the same
  weights.

With `sdxl` / `pixart` in `--backbones`, the same overhead and NASA-cost ratios for `OneStepXLPipeline` (SDXL-shaped
UNet, two CLIP encoders) and `OneStepPixArtPipeline` (PixArt-shaped DiT, T5 encoder), prefixed `sdxl_` / `pixart_`;
their parts are each backbone's own `encode_prompt`, one network forward through the backbone adapter, and the decode.
"""

from __future__ import annotations

import argparse
import time

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    PixArtTransformer2DModel,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from diffusers_onestep import (
    ConsistencyStudentScheduler,
    OneStepPipeline,
    OneStepPixArtPipeline,
    OneStepXLPipeline,
    nasa_attention,
)
from diffusers_onestep.pipelines.text_encoding import encode_prompt
from diffusers_onestep.testing_utils import build_clip_tokenizer, build_t5_tokenizer


def build_models(resolution: int) -> dict:
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=resolution,
    )
    unet = UNet2DConditionModel(
        sample_size=resolution // 4,
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(hidden_size=128, intermediate_size=512, num_attention_heads=4, num_hidden_layers=4,
                       vocab_size=1100, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    )  # fmt: skip
    tokenizer = build_clip_tokenizer(model_max_length=77)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    return {"vae": vae, "unet": unet, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def _clip(hidden_size: int, projection: bool = False):
    config = CLIPTextConfig(hidden_size=hidden_size, intermediate_size=4 * hidden_size, num_attention_heads=4,
                            num_hidden_layers=4, vocab_size=1100, max_position_embeddings=77, bos_token_id=0,
                            eos_token_id=1, pad_token_id=1, projection_dim=hidden_size)  # fmt: skip
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def build_sibling(backbone: str, vae: AutoencoderKL, resolution: int):
    """An SDXL- or PixArt-shaped student pipeline of a few million parameters, random weights."""
    torch.manual_seed(0)
    student_scheduler = ConsistencyStudentScheduler(beta_schedule="scaled_linear", t_init=999)
    if backbone == "sdxl":
        unet = UNet2DConditionModel(
            sample_size=resolution // 4, block_out_channels=(64, 128, 128), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=8,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=32,
            projection_class_embeddings_input_dim=6 * 32 + 64, cross_attention_dim=128, norm_num_groups=32,
        )  # fmt: skip
        return OneStepXLPipeline(
            vae=vae, text_encoder=_clip(64), text_encoder_2=_clip(64, projection=True),
            tokenizer=build_clip_tokenizer(model_max_length=77), tokenizer_2=build_clip_tokenizer(model_max_length=77),
            unet=unet, scheduler=student_scheduler,
        )  # fmt: skip
    transformer = PixArtTransformer2DModel(
        sample_size=resolution // 4, num_layers=6, patch_size=2, attention_head_dim=32, num_attention_heads=4,
        caption_channels=128, cross_attention_dim=128, in_channels=4, out_channels=8, attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    )  # fmt: skip
    text_encoder = T5EncoderModel(T5Config(vocab_size=64, d_model=128, d_kv=32, d_ff=512, num_layers=4, num_heads=4,
                                           pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))  # fmt: skip
    student_scheduler = ConsistencyStudentScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    return OneStepPixArtPipeline(tokenizer=build_t5_tokenizer(model_max_length=120), text_encoder=text_encoder,
                                 vae=vae, transformer=transformer, scheduler=student_scheduler)  # fmt: skip


def sibling_figures(backbone: str, vae: AutoencoderKL, resolution: int, repeats: int) -> dict:
    """Overhead (a 1-step call / its parts timed alone) and NASA cost (with a negative / without) of a sibling."""
    pipe = build_sibling(backbone, vae, resolution)
    pipe.set_progress_bar_config(disable=True)
    prompt, negative = "a photo of the digit seven", "a cat"
    latent_size = resolution // pipe.vae_scale_factor
    z = torch.randn(1, 4, latent_size, latent_size, generator=torch.Generator().manual_seed(0))
    network = pipe.denoiser_network
    extra = {"use_resolution_binning": False} if backbone == "pixart" else {}
    if backbone == "sdxl":
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False)
        time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32)
        cond = {"encoder_hidden_states": embeds, "text_embeds": pooled, "time_ids": time_ids}

        def encode():
            return pipe.encode_prompt(prompt, do_classifier_free_guidance=False)
    else:
        embeds, mask, _, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False)
        cond = {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}

        def encode():
            return pipe.encode_prompt(prompt, do_classifier_free_guidance=False)

    t = torch.tensor(999)
    times = interleaved(
        {
            "encode": encode,
            "network": lambda: pipe.backbone(network, z, t, cond),
            "decode": lambda: pipe.decode_latents(z),
            "call": lambda: pipe(prompt, latents=z, output_type="pt", **extra),
            "call_nasa": lambda: pipe(prompt, negative_prompt=negative, latents=z, output_type="pt", **extra),
        },
        repeats,
    )
    parts = times["encode"] + times["network"] + times["decode"]
    return {
        f"{backbone}_parameters_millions": sum(p.numel() for p in network.parameters()) / 1e6,
        f"{backbone}_overhead": times["call"] / parts,
        f"{backbone}_nasa_cost": times["call_nasa"] / times["call"],
    }


def interleaved(candidates: dict, repeats: int) -> dict:
    """
    Seconds per candidate: each round times every candidate once, in turn, and the minimum over rounds is kept. On a
    shared machine background load only ever adds time, so the minimum is the least disturbed estimate of the cost,
    and interleaving exposes every candidate to the same load.
    """
    for fn in candidates.values():
        fn()  # warm-up
    samples = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in samples.items()}


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backbones", default="sd,sdxl,pixart", help="comma-separated: sd, sdxl, pixart")
    args = parser.parse_args(argv)
    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    unknown = sorted(set(backbones) - {"sd", "sdxl", "pixart"})
    if unknown or not backbones:
        parser.error(f"argument --backbones: {unknown or 'none'} not in ['sd', 'sdxl', 'pixart']")
    torch.set_num_threads(args.threads)

    models = build_models(args.resolution)
    student_scheduler = ConsistencyStudentScheduler.from_config(models["scheduler"].config, t_init=999)
    pipe = OneStepPipeline(**{**models, "scheduler": student_scheduler})
    sd = StableDiffusionPipeline(**models, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    for p in (pipe, sd):
        p.set_progress_bar_config(disable=True)
    n_params = sum(p.numel() for p in models["unet"].parameters())

    prompt, negative = "a photo of the digit seven", "a cat"
    latent_size = args.resolution // pipe.vae_scale_factor
    z = torch.randn(1, 4, latent_size, latent_size, generator=torch.Generator().manual_seed(0))
    embeds = encode_prompt(pipe.tokenizer, pipe.text_encoder, prompt)
    neg_embeds = encode_prompt(pipe.tokenizer, pipe.text_encoder, negative)

    def unet_forward():
        return pipe.unet(z, 999, encoder_hidden_states=embeds).sample

    def unet_forward_nasa():
        with nasa_attention(pipe.unet, neg_embeds, 0.1):
            return pipe.unet(z, 999, encoder_hidden_states=embeds).sample

    def gen(seed=0):
        return torch.Generator().manual_seed(seed)

    times = interleaved(
        {
            "encode": lambda: encode_prompt(pipe.tokenizer, pipe.text_encoder, prompt),
            "unet": unet_forward,
            "unet_nasa": unet_forward_nasa,
            "decode": lambda: pipe.decode_latents(z),
            "call": lambda: pipe(prompt, latents=z, output_type="pt"),
            "call_nasa": lambda: pipe(prompt, negative_prompt=negative, latents=z, output_type="pt"),
            "call_cfg": lambda: pipe(prompt, negative_prompt=negative, nasa_scale=0.0, guidance_scale=2.0,
                                     latents=z, output_type="pt"),  # fmt: skip
            "sd_one_step": lambda: sd(prompt, num_inference_steps=1, guidance_scale=0.0, latents=z, output_type="pt",
                                      generator=gen()),  # fmt: skip
        },
        args.repeats,
    )
    results = {} if "sd" not in backbones else {
        "unet_parameters_millions": n_params / 1e6,
        "resolution": args.resolution,
        "call_ms": times["call"] * 1e3,
        "parts_ms": (times["encode"] + times["unet"] + times["decode"]) * 1e3,
        "overhead": times["call"] / (times["encode"] + times["unet"] + times["decode"]),
        "nasa_cost": times["call_nasa"] / times["call"],
        "nasa_unet_cost": times["unet_nasa"] / times["unet"],
        "cfg_over_nasa": times["call_cfg"] / times["call_nasa"],
        "onestep_over_sd": times["call"] / times["sd_one_step"],
    }
    for backbone in backbones:
        if backbone != "sd":
            results.update(sibling_figures(backbone, models["vae"], args.resolution, args.repeats))
    for name, value in results.items():
        print(f"{name}: {value:.3f}" if isinstance(value, float) else f"{name}: {value}")
    return results


if __name__ == "__main__":
    main()
