"""Trains the digits teacher and saves it as a Stable-Diffusion-format (or, with `--backbone dit`, a PixArt-α-format)
checkpoint directory.

    OMP_NUM_THREADS=1 nice -n 10 python examples/digits/train_teacher.py \
        --vae_dir /work/digits_artifacts/vae --output_dir /work/digits_artifacts/teacher
    OMP_NUM_THREADS=1 nice -n 10 python examples/digits/train_teacher.py --backbone dit \
        --vae_dir examples/digits/checkpoints/teacher/vae --output_dir /work/digits_artifacts/dit_teacher
    OMP_NUM_THREADS=1 nice -n 10 python examples/digits/train_teacher.py --backbone sdxl \
        --vae_dir examples/digits/checkpoints/teacher/vae --output_dir /work/digits_artifacts/sdxl_teacher

The SDXL teacher (`build_sdxl_teacher_components`) is a `StableDiffusionXLPipeline` directory: the UNet of the SD
teacher with `addition_embed_type="text_time"` (pooled text embeddings and size / crop ids), two two-layer CLIP text
encoders of width 32 (the second `CLIPTextModelWithProjection`, 32-wide projection) whose penultimate states are
concatenated into the 64-wide cross-attention text, captions encoded by `StableDiffusionXLPipeline.encode_prompt`
itself (through the training backbone's `encode`), saved with `force_zeros_for_empty_prompt=False` since its
unconditional branch is trained on `""`.
The DiT teacher (`build_dit_teacher_components`) is a `PixArtAlphaPipeline` directory: a `PixArtTransformer2DModel`
(patch 1 on the 8x8 latents, 6 layers of width 128, no learned sigma), a two-layer `T5EncoderModel` (width 64) with
the unigram T5 tokenizer of `testing_utils.build_t5_tokenizer`, trained jointly from scratch with the same recipe,
captions encoded by `PixArtAlphaPipeline.encode_prompt` itself, and the same VAE and DDPM schedule.

The saved directory loads with `StableDiffusionPipeline.from_pretrained(output_dir)`, and the distillation scripts take
it as `--pretrained_teacher_model_name_or_path` exactly like `stable-diffusion-v1-5`. Components:

- `vae`: the frozen one-level `AutoencoderKL` of `train_vae.py` (8x8 latents, `vae_scale_factor` 1);
- `tokenizer` + `text_encoder`: a byte-level `CLIPTokenizer` whose caption words are single tokens and a two-layer
  `CLIPTextModel` (hidden size 64), trained jointly with the UNet from scratch;
- `unet`: `UNet2DConditionModel`, block_out_channels (64, 128), one layer per block, cross-attention at 8x8
  (about 3.1M parameters);
- `scheduler`: `DDPMScheduler` with Stable Diffusion's `scaled_linear` betas (0.00085..0.012), epsilon prediction.

Training is Stable Diffusion's: `x_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps`, `t ~ U{0..999}`, loss `|eps_hat - eps|^2`,
captions re-drawn every step from the caption distribution of `digits_data` and replaced by `""` with probability
`--caption_dropout` (so classifier-free guidance works), prompts encoded with `diffusers_onestep.pipelines.text_encoding`
(the same function the pipelines use), EMA of UNet and text encoder weights.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.training_utils import EMAModel
from digits_data import TOKENIZER_WORDS, load_digits_split, random_captions
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from diffusers_onestep.models.backbones import backbone_for
from diffusers_onestep.pipelines.text_encoding import encode_prompt
from diffusers_onestep.testing_utils import build_clip_tokenizer, build_t5_tokenizer
from diffusers_onestep.training_utils.backbones import TRAINING_BACKBONES


__all__ = [
    "build_dit_teacher_components", "build_sdxl_teacher_components", "build_teacher_components", "main", "save_teacher",
    "train_teacher",
]  # fmt: skip


def _digits_scheduler() -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", clip_sample=False, steps_offset=1,
    )  # fmt: skip


def build_dit_teacher_components(
    vae: AutoencoderKL,
    width: int = 128,
    num_layers: int = 6,
    text_hidden_size: int = 64,
    text_layers: int = 2,
    model_max_length: int = 16,
    seed: int = 0,
) -> dict:
    r"""
    Freshly initialised PixArt-α-shaped teacher components around a trained `vae` (the `PixArtAlphaPipeline`
    arguments): transformer of `num_layers` blocks of `width` (4 heads), patch 1, `caption_channels` equal to the T5
    width, epsilon output only (no learned sigma).
    """
    tokenizer = build_t5_tokenizer(TOKENIZER_WORDS, model_max_length=model_max_length)
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(
        T5Config(vocab_size=len(tokenizer), d_model=text_hidden_size, d_kv=text_hidden_size // 4,
                 d_ff=4 * text_hidden_size, num_layers=text_layers, num_heads=4, pad_token_id=0, eos_token_id=1,
                 decoder_start_token_id=0, dropout_rate=0.0)  # fmt: skip
    )
    torch.manual_seed(seed)
    latent_size = vae.config.sample_size // 2 ** (len(vae.config.block_out_channels) - 1)
    transformer = PixArtTransformer2DModel(
        sample_size=latent_size, num_layers=num_layers, patch_size=1, attention_head_dim=width // 4,
        num_attention_heads=4, caption_channels=text_hidden_size, cross_attention_dim=width,
        in_channels=vae.config.latent_channels, out_channels=vae.config.latent_channels, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False,
    )  # fmt: skip
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "transformer": transformer,
            "scheduler": _digits_scheduler()}  # fmt: skip


def _clip_text_config(tokenizer, hidden_size: int, layers: int, **kwargs) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )  # fmt: skip


def build_sdxl_teacher_components(
    vae: AutoencoderKL,
    block_out_channels: tuple[int, ...] = (64, 128),
    text_hidden_size: int = 32,
    text_layers: int = 2,
    model_max_length: int = 16,
    time_embed_dim: int = 8,
    seed: int = 0,
) -> dict:
    r"""
    Freshly initialised SDXL-shaped teacher components around a trained `vae` (the `StableDiffusionXLPipeline`
    arguments): two CLIP text encoders of `text_hidden_size` (the second with a projection of that width), a UNet like
    `build_teacher_components`' with `addition_embed_type="text_time"` and `cross_attention_dim = 2 x
    text_hidden_size`.
    """
    tokenizer, tokenizer_2 = (build_clip_tokenizer(TOKENIZER_WORDS, model_max_length=model_max_length) for _ in "12")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer, text_hidden_size, text_layers))
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(
        _clip_text_config(tokenizer_2, text_hidden_size, text_layers, projection_dim=text_hidden_size)
    )
    torch.manual_seed(seed)
    unet = _digits_unet(vae, block_out_channels, 2 * text_hidden_size, addition_embed_type="text_time",
                        addition_time_embed_dim=time_embed_dim,
                        projection_class_embeddings_input_dim=6 * time_embed_dim + text_hidden_size)  # fmt: skip
    return {"vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2, "tokenizer": tokenizer,
            "tokenizer_2": tokenizer_2, "unet": unet, "scheduler": _digits_scheduler()}  # fmt: skip


def _digits_unet(vae: AutoencoderKL, block_out_channels: tuple[int, ...], cross_attention_dim: int, **kwargs):
    num_levels = len(block_out_channels)
    return UNet2DConditionModel(
        sample_size=vae.config.sample_size // 2 ** (len(vae.config.block_out_channels) - 1),
        in_channels=vae.config.latent_channels,
        out_channels=vae.config.latent_channels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        # cross-attention at the full 8x8 resolution only, plain ResNet blocks below
        down_block_types=("CrossAttnDownBlock2D",) + ("DownBlock2D",) * (num_levels - 1),
        up_block_types=("UpBlock2D",) * (num_levels - 1) + ("CrossAttnUpBlock2D",),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=min(32, block_out_channels[0]),
        **kwargs,
    )


def _encode_captions(components: dict, captions: list[str]) -> dict:
    """The conditioning dict of `captions`, differentiable through the text encoder(s) (trained jointly)."""
    if "text_encoder_2" in components:
        pipe = StableDiffusionXLPipeline(**components, force_zeros_for_empty_prompt=False)
        size = (components["vae"].config.sample_size,) * 2
        return TRAINING_BACKBONES["sdxl"].encode(pipe, captions, device="cpu", dtype=None, image_size=size,
                                                 unconditional=False)  # fmt: skip
    if "transformer" in components:
        pipe = PixArtAlphaPipeline(**components)
        max_length = components["tokenizer"].model_max_length
        embeds, mask, _, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False, device="cpu",
                                                clean_caption=False, max_sequence_length=max_length)  # fmt: skip
        return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}
    return {"encoder_hidden_states": encode_prompt(components["tokenizer"], components["text_encoder"], captions)}


def build_teacher_components(
    vae: AutoencoderKL,
    block_out_channels: tuple[int, ...] = (64, 128),
    text_hidden_size: int = 64,
    text_layers: int = 2,
    model_max_length: int = 16,
    seed: int = 0,
) -> dict:
    r"""
    Freshly initialised teacher components around a trained `vae` (see the module docstring).

    Returns:
        `dict` with `vae`, `text_encoder`, `tokenizer`, `unet`, `scheduler` (the `StableDiffusionPipeline` arguments
        without the safety checker).
    """
    tokenizer = build_clip_tokenizer(TOKENIZER_WORDS, model_max_length=model_max_length)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer, text_hidden_size, text_layers))
    torch.manual_seed(seed)
    unet = _digits_unet(vae, block_out_channels, text_hidden_size)
    return {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "unet": unet,
            "scheduler": _digits_scheduler()}  # fmt: skip


def train_teacher(
    components: dict,
    images: torch.Tensor,
    labels: torch.Tensor,
    max_train_steps: int = 3000,
    train_batch_size: int = 64,
    learning_rate: float = 5e-4,
    lr_warmup_steps: int = 200,
    caption_dropout: float = 0.1,
    ema_decay: float | None = 0.999,
    seed: int = 0,
    log_every: int = 50,
) -> list[dict]:
    r"""
    Trains the denoiser (`components["unet"]` or `["transformer"]`) and `components["text_encoder"]` in place (the EMA
    weights are copied in at the end), through the backbone adapter of `diffusers_onestep.models.backbones`.

    Args:
        images (`torch.Tensor` of shape `(N, 1, 8, 8)`): training images in `[-1, 1]`.
        labels (`torch.Tensor` of shape `(N,)`): their digits (captions are drawn from them every step).
        ema_decay (`float`, *optional*): maximum EMA decay (with diffusers' warm-up); `None` disables EMA.

    Returns:
        `list[dict]`: the training log (`step`, `loss`, `seconds_per_step`), one entry per `log_every` steps.
    """
    vae, scheduler = components["vae"], components["scheduler"]
    text_encoders = [components[k] for k in ("text_encoder", "text_encoder_2") if k in components]
    unet = components.get("unet", components.get("transformer"))
    backbone = backbone_for(unet)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)

    # 1. Encode the training images once: the VAE is frozen, a fresh posterior sample is drawn every step
    vae.requires_grad_(False).eval()
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
    latent_mean, latent_std = posterior.mean, posterior.std
    scaling_factor = vae.config.scaling_factor

    unet.train()
    parameters = list(unet.parameters())
    for text_encoder in text_encoders:
        text_encoder.train()
        parameters += list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=1e-2)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(lr_warmup_steps, 1))
    )
    ema = None
    if ema_decay is not None:
        ema = EMAModel(parameters, decay=ema_decay, use_ema_warmup=True, power=3 / 4)

    alphas_cumprod = scheduler.alphas_cumprod
    log, running_loss, start, order = [], 0.0, time.perf_counter(), torch.empty(0, dtype=torch.long)
    for step in range(1, max_train_steps + 1):
        if len(order) < train_batch_size:
            order = torch.cat([order, torch.randperm(len(images), generator=generator)])
        batch, order = order[:train_batch_size], order[train_batch_size:]

        # 2. Latents z ~ q(z | x), scaled to unit variance as Stable Diffusion does
        noise_shape = latent_mean[batch].shape
        latents = latent_mean[batch] + latent_std[batch] * torch.randn(noise_shape, generator=generator)
        latents = latents * scaling_factor

        # 3. Captions, with caption dropout to the empty prompt (the unconditional branch of CFG)
        captions = random_captions(labels[batch], generator)
        drop = torch.rand(len(captions), generator=generator) < caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop)]
        unique = sorted(set(captions))
        rows = torch.tensor([unique.index(c) for c in captions])
        cond = {k: v[rows] for k, v in _encode_captions(components, unique).items()}

        # 4. Forward diffusion x_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps, t ~ U{0..T-1}
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, len(alphas_cumprod), (len(batch),), generator=generator)
        noisy_latents = scheduler.add_noise(latents, noise, timesteps)
        target = (
            noise
            if scheduler.config.prediction_type == "epsilon"
            else scheduler.get_velocity(latents, noise, timesteps)
        )

        # 5. Denoising loss and update
        model_output = backbone(unet, noisy_latents, timesteps, cond)
        loss = F.mse_loss(model_output, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        lr_schedule.step()
        if ema is not None:
            ema.step(parameters)

        running_loss += loss.item()
        if step % log_every == 0 or step == max_train_steps:
            seconds = (time.perf_counter() - start) / step
            count = log_every if step % log_every == 0 else step % log_every
            entry = {"step": step, "loss": running_loss / count, "seconds_per_step": seconds}
            log.append(entry)
            running_loss = 0.0
            print(f"step {step}/{max_train_steps}: loss {entry['loss']:.4f} ({seconds:.3f} s/step)", flush=True)

    if ema is not None:
        ema.copy_to(parameters)
    unet.eval()
    for text_encoder in text_encoders:
        text_encoder.eval()
    return log


def save_teacher(components: dict, output_dir: str) -> StableDiffusionPipeline | PixArtAlphaPipeline:
    r"""
    Saves `components` as a `StableDiffusionPipeline` (or, with a transformer, `PixArtAlphaPipeline`) directory
    (safetensors, no safety checker). The directory is written next to `output_dir` first and moved into place, so a
    failed save never destroys a previous teacher.
    """
    if "transformer" in components:
        pipe = PixArtAlphaPipeline(**components)
    elif "text_encoder_2" in components:
        pipe = StableDiffusionXLPipeline(**components, force_zeros_for_empty_prompt=False)
    else:
        pipe = StableDiffusionPipeline(
            **components, safety_checker=None, feature_extractor=None, image_encoder=None,
            requires_safety_checker=False,
        )  # fmt: skip
    staging = output_dir.rstrip("/") + ".saving"
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(staging, safe_serialization=True)
    shutil.rmtree(output_dir, ignore_errors=True)
    os.replace(staging, output_dir)
    return pipe


def main(argv: list[str] | None = None) -> StableDiffusionPipeline:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae_dir", required=True, help="the AutoencoderKL saved by train_vae.py")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_train_steps", type=int, default=3000)
    parser.add_argument("--train_batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--lr_warmup_steps", type=int, default=200)
    parser.add_argument("--caption_dropout", type=float, default=0.1)
    parser.add_argument("--ema_decay", type=float, default=0.999, help="maximum EMA decay; 0 disables EMA")
    parser.add_argument("--backbone", choices=["unet", "sdxl", "dit"], default="unet",
                        help="unet: the SD teacher; sdxl: the SDXL-shaped one; dit: the PixArt-α-shaped one")
    parser.add_argument("--block_out_channels", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log_every", type=int, default=50)
    args = parser.parse_args(argv)

    images, labels = load_digits_split("train")
    vae = AutoencoderKL.from_pretrained(args.vae_dir)
    if args.backbone == "dit":
        components = build_dit_teacher_components(vae, seed=args.seed)
    elif args.backbone == "sdxl":
        components = build_sdxl_teacher_components(vae, tuple(args.block_out_channels), seed=args.seed)
    else:
        components = build_teacher_components(vae, tuple(args.block_out_channels), seed=args.seed)
    network = components.get("unet", components.get("transformer"))
    num_parameters = sum(p.numel() for p in network.parameters())
    print(f"denoiser parameters: {num_parameters / 1e6:.3f}M, text encoder parameters: "
          f"{sum(p.numel() for k in ('text_encoder', 'text_encoder_2') for p in getattr(components.get(k), 'parameters', list)()) / 1e6:.3f}M")  # fmt: skip
    start = time.perf_counter()
    log = train_teacher(
        components,
        images,
        labels,
        max_train_steps=args.max_train_steps,
        train_batch_size=args.train_batch_size,
        learning_rate=args.learning_rate,
        lr_warmup_steps=args.lr_warmup_steps,
        caption_dropout=args.caption_dropout,
        ema_decay=args.ema_decay or None,
        seed=args.seed,
        log_every=args.log_every,
    )
    train_seconds = time.perf_counter() - start
    pipe = save_teacher(components, args.output_dir)
    with open(os.path.join(args.output_dir, "training_log.json"), "w") as f:
        json.dump(
            {"args": vars(args), "train_seconds": train_seconds, "unet_parameters": num_parameters, "log": log}, f
        )
    print(f"train_seconds: {train_seconds:.1f}")
    print(f"seconds_per_step: {train_seconds / max(args.max_train_steps, 1):.3f}")
    return pipe


if __name__ == "__main__":
    main()
