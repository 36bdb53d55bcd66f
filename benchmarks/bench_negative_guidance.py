"""Cost of attention-space negative prompts (NASA, NAG) beside output-space CFG, per pipeline family, as ratios.

    python benchmarks/bench_negative_guidance.py [--repeats 10] [--families sd,sdxl,pixart,sd3,flux] [--full_size]

Part 1, tiny pipelines (the test suite's components, built in code) of every family `diffusers_onestep.nasa`
supports: one denoising step (`output_type="latent"`) of the stock diffusers pipeline with a negative prompt
through NASA / NAG (entering the `nasa` block included), or through its own CFG (`guidance_scale=2`, Flux
`true_cfg_scale=2`, with `negative_prompt=`: two network evaluations per image), divided by the same call without a
negative; the negative's text encoding is part of every guided call. (Two steps: diffusers' PixArt pipeline fails at one with DPM-Solver.) Times are the minimum over interleaved repeats (`bench_inference`).

Part 2, `--full_size`: the SD1.5 and SDXL UNets built from their published configs with random weights (no
download; speed and FLOPs do not depend on the weights). FLOPs of one UNet forward at the native resolution with 77
negative tokens, counted by `torch.utils.flop_counter.FlopCounterMode` on the meta device (nothing is computed), for
plain / NASA / NAG / CFG (batch 2); SNOOPI counts NASA at +1.89% of the FLOPs. Then the CPU time of `--full_repeats`
forwards of the SD1.5 UNet at 512x512 (SDXL at `--sdxl_time_resolution`, 512 by default: a 1024x1024 CPU forward
takes minutes), same ratios.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

import diffusers_onestep
from diffusers_onestep.attention import NAGGuidance, nasa_attention
from diffusers_onestep.testing_utils import DUMMY_CALL_KWARGS, get_dummy_pipeline


sys.path.insert(0, os.path.dirname(__file__))
from bench_inference import interleaved  # noqa: E402


SD15_UNET = {
    "sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8, "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, "layers_per_block": 2,
}  # fmt: skip
SDXL_UNET = {
    "sample_size": 128, "cross_attention_dim": 2048, "attention_head_dim": (5, 10, 20), "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10), "use_linear_projection": True, "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
}  # fmt: skip


def tiny_figures(family: str, repeats: int) -> dict:
    pipe, kwargs = get_dummy_pipeline(family), DUMMY_CALL_KWARGS[family]
    pipe.set_progress_bar_config(disable=True)
    nag_scale = None  # the paper's per-family default phi

    def call(**extra):
        return lambda: pipe("a photo of a cat", num_inference_steps=2, height=16, width=16, output_type="latent",
                            generator=torch.Generator().manual_seed(0), **kwargs, **extra)  # fmt: skip

    def guided(method, scale):
        def run():
            with diffusers_onestep.nasa(pipe, negative_prompt="dog", scale=scale, method=method):
                call(guidance_scale=1.0)()

        return run

    times = interleaved(
        {
            "plain": call(guidance_scale=1.0),
            "nasa": guided("nasa", 0.2),
            "nag": guided("nag", nag_scale),
            # Flux's `guidance_scale` is its distilled-guidance input: its true CFG is `true_cfg_scale`
            "cfg": call(guidance_scale=1.0, true_cfg_scale=2.0, negative_prompt="dog") if family == "flux"
            else call(guidance_scale=2.0, negative_prompt="dog"),
        },
        repeats,
    )
    return {f"{family}_{name}_cost": times[name] / times["plain"] for name in ("nasa", "nag", "cfg")}


def _unet_inputs(config: dict, batch: int, resolution: int | None, device) -> tuple:
    size = (resolution // 8) if resolution else config["sample_size"]
    latents = torch.randn(batch, 4, size, size, device=device)
    text = torch.randn(batch, 77, config["cross_attention_dim"], device=device)
    added = None
    if config.get("addition_embed_type") == "text_time":
        added = {"text_embeds": torch.randn(batch, 1280, device=device), "time_ids": torch.randn(batch, 6, device=device)}
    return latents, text, added


def _variants(unet, config, resolution, device) -> dict:
    latents, text, added = _unet_inputs(config, 1, resolution, device)
    negative = torch.randn_like(text)
    latents2, text2, added2 = _unet_inputs(config, 2, resolution, device)

    def forward(x, c, a):
        return lambda: unet(x, 500, encoder_hidden_states=c, added_cond_kwargs=a)

    def with_guidance(**kwargs):
        def run():
            with nasa_attention(unet, negative, **kwargs):
                forward(latents, text, added)()

        return run

    return {
        "plain": forward(latents, text, added),
        "nasa": with_guidance(scale=0.1),
        "nag": with_guidance(guidance=NAGGuidance(scale=2.0, tau=2.5, alpha=0.5)),
        "cfg": forward(latents2, text2, added2),
    }


def full_size_figures(repeats: int, sdxl_time_resolution: int) -> dict:
    figures = {}
    for name, config in (("sd15", SD15_UNET), ("sdxl", SDXL_UNET)):
        with torch.device("meta"):
            unet = UNet2DConditionModel(**config).eval()
        flops = {}
        for variant, fn in _variants(unet, config, None, "meta").items():
            with FlopCounterMode(display=False) as counter:
                fn()
            flops[variant] = counter.get_total_flops()
        figures[f"{name}_unet_gflops"] = flops["plain"] / 1e9
        for variant in ("nasa", "nag", "cfg"):
            figures[f"{name}_{variant}_flops_ratio"] = flops[variant] / flops["plain"]
        del unet
        if repeats:
            torch.manual_seed(0)
            unet = UNet2DConditionModel(**config).eval()
            resolution = 512 if name == "sd15" else sdxl_time_resolution
            start = time.perf_counter()
            times = interleaved(_variants(unet, config, resolution, "cpu"), repeats)
            figures[f"{name}_cpu_seconds_plain_at_{resolution}"] = times["plain"]
            for variant in ("nasa", "nag", "cfg"):
                figures[f"{name}_{variant}_time_ratio"] = times[variant] / times["plain"]
            figures[f"{name}_benchmark_seconds"] = time.perf_counter() - start
            del unet
    return figures


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--families", default="sd,sdxl,pixart,sd3,flux")
    parser.add_argument("--full_size", action="store_true", help="also the SD1.5 / SDXL UNets at full size")
    parser.add_argument("--full_repeats", type=int, default=2, help="timed forwards per variant at full size (0: FLOPs only)")
    parser.add_argument("--sdxl_time_resolution", type=int, default=512)
    args = parser.parse_args(argv)
    families = [f for f in args.families.split(",") if f]
    unknown = sorted(set(families) - set(DUMMY_CALL_KWARGS))
    if unknown:
        parser.error(f"--families: unknown {unknown}; allowed: {', '.join(DUMMY_CALL_KWARGS)}")
    figures = {}
    for family in families:
        figures.update(tiny_figures(family, args.repeats))
    if args.full_size:
        figures.update(full_size_figures(args.full_repeats, args.sdxl_time_resolution))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for key, value in figures.items():
        print(f"{key}: {value:.4f}")
    return figures


if __name__ == "__main__":
    main()
