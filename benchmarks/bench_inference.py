"""Inference cost of OneStepPipeline, as ratios measured in one process (never timed assertions in tests).

    python benchmarks/bench_inference.py [--repeats 30] [--resolution 64]

Builds a Stable-Diffusion-shaped model of a few million parameters in code (random weights: speed does not depend
on them) and reports, with the minimum over interleaved repeats:

- overhead: a 1-step call / the sum of its parts timed alone (prompt encoding, one UNet forward, VAE decode);
- nasa_cost: a 1-step call with a negative prompt / without (NASA: one extra attention per cross-attention layer);
  nasa_unet_cost isolates the UNet forward with NASA installed / plain;
- cfg_over_nasa: output-space CFG with the negative prompt (two UNet passes) / NASA with the same negative;
- onestep_over_sd: OneStepPipeline / StableDiffusionPipeline(num_inference_steps=1, guidance_scale=0) on the same
  weights.
"""

from __future__ import annotations

import argparse
import time

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from diffusers_onestep import ConsistencyStudentScheduler, OneStepPipeline, nasa_attention
from diffusers_onestep.pipelines.text_encoding import encode_prompt
from diffusers_onestep.testing_utils import build_clip_tokenizer


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
    args = parser.parse_args(argv)
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
    results = {
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
    for name, value in results.items():
        print(f"{name}: {value:.3f}" if isinstance(value, float) else f"{name}: {value}")
    return results


if __name__ == "__main__":
    main()
