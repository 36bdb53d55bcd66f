#!/usr/bin/env python
"""ACT: Adversarial Consistency Training of a text-to-image student on real image-caption data.

Kong et al., "ACT: Adversarial Consistency Training for One-step Diffusion Models", CVPR 2024 (arXiv 2311.14097;
official code `kong13661/ACT`); METHODS.md section 6. Consistency training (the target from the student's EMA on a
Karras grid of `N(k)` points growing from 2 to 150, the EMA decay tied to `N(k)`) plus a discriminator at every noise
level: the generator loss is `(1 - lambda) L_CT + lambda softplus(-D(f(x_{n+1}), t_{n+1}, c))`, D is trained on
`softplus(D(fake)) + softplus(-D(real))` with lazy R1. Each iteration splits the batch as the official loop: the first
half for the student's step (D frozen), then D's step on the second half (a quarter of fakes `f(x_t, t)` from the
updated online student, a quarter of clean real latents), then the EMA. `--adversarial_weight 0` is plain
consistency training (no D; the whole batch goes to the student). The loss lives in `diffusers_onestep.losses.act`
(sharing `losses.consistency`), D in `models.discriminator`, the set-up in `training_utils.Distillation`.

    accelerate launch training/train_act.py --preset sd15-act --train_data_dir my_imagefolder --output_dir sd15-act

Adapted from the pixel-space, class-conditional official code: the student is initialised from the teacher (ACT
trains from scratch), D sees latents and the pooled text embedding, the distance is pseudo-Huber by default
(`--distance lpips`: ACT's LPIPS on decoded images, untested offline), ACT-Aug's adaptive augmentation is not
implemented.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import DiffusionPipeline

from diffusers_onestep.losses import ACTLoss, Denoiser
from diffusers_onestep.models import LatentDiscriminator, pooled_text, slice_conditioning
from diffusers_onestep.training_utils import (
    AdapterView,
    Distillation,
    ImageCaptionDataset,
    TrainingArgumentError,
    TrainingArguments,
    arg,
    encode_images,
    encode_prompts,
    parse_args,
    rank_slice,
    run_script,
    validate_training_args,
)


__all__ = ["ACTArguments", "main"]


@dataclass
class ACTArguments:
    r"""ACT's hyperparameters (METHODS.md section 6); defaults are the official CIFAR-10 ones (`train_cifar10.py`)."""

    adversarial_weight: float = arg(0.3, "lambda of (1 - lambda) L_CT + lambda L_adv (0: plain CT, no D).", low=0,
                                    high=1)  # fmt: skip
    mid_weight: float | None = arg(None, "Per-noise-level lambda: its value at mid grid (ACT ImageNet 0.2 with lambda "
                                   "0.6); default constant.", low=0, low_open=True)  # fmt: skip
    r1_gamma: float = arg(10.0, "R1 weight gamma.", low=0)
    r1_interval: int = arg(16, "R1 every this many steps (lazy, not rescaled).", low=1)
    discriminator_learning_rate: float | None = arg(None, "D's learning rate (default: the student's).", low=0,
                                                    low_open=True)  # fmt: skip
    discriminator_block_out_channels: str | None = arg(None, "D's channels per level, e.g. '64,128' (default: the "
                                                       "teacher UNet's encoder).")  # fmt: skip
    bins_min: int = arg(2, "N(k) at the start (grid points).", low=2)
    bins_max: int = arg(150, "N(k) at the end (ACT CIFAR 150, ImageNet 200).", low=2)
    ema_decay_init: float = arg(0.9, "mu0 of the EMA decay mu(k) = mu0^(s0 / (N(k) - 1)) (ImageNet 0.95).", low=0,
                                high=1, low_open=True, high_open=True)  # fmt: skip
    huber_c: float | None = arg(None, "Pseudo-Huber c (default iCT's 0.00054 sqrt(latent size)).", low=0)
    distance: Literal["pseudo_huber", "lpips"] = arg(
        "pseudo_huber", "CT distance: pseudo-Huber on latents, or ACT's LPIPS (VGG) on VAE-decoded images, resized to "
        "224 (needs the `lpips` package and its VGG weights, downloaded by torchvision on first use).",
    )  # fmt: skip
    rho: float = arg(7.0, "Karras rho.", low=0, low_open=True)


def _discriminator(act: ACTArguments, args: TrainingArguments):
    widths = None
    if act.discriminator_block_out_channels:
        try:
            widths = tuple(int(w) for w in act.discriminator_block_out_channels.split(","))
        except ValueError:
            widths = None
        if not widths or min(widths) < 1 or any(w % 8 for w in widths):
            raise TrainingArgumentError(
                "`--discriminator_block_out_channels` must be comma-separated positive multiples of 8 (the attention "
                f"head width), e.g. '64,128', got {act.discriminator_block_out_channels!r}."
            )

    def build(teacher):
        text = pooled_text(encode_prompts(teacher, [""], device=teacher.vae.device, resolution=args.resolution))
        overrides = {}
        if widths:
            groups = min(32, math.gcd(*widths))
            overrides = {"block_out_channels": widths, "norm_num_groups": groups,
                         "down_block_types": ("DownBlock2D",) * (len(widths) - 1) + ("AttnDownBlock2D",)}  # fmt: skip
        latent_size = (args.resolution or teacher.network.config.sample_size * teacher.vae_scale_factor)
        latent_size //= teacher.vae_scale_factor
        return LatentDiscriminator.for_network(teacher.network, text.shape[-1], latent_size=latent_size, **overrides)

    return build


def lpips_distance(vae):
    r"""ACT's LPIPS distance (`models/loss.py`: VGG, both images at 224, the target clipped to [-1, 1]) on latents
    decoded by `vae` (gradients flow through the online side's decode). *Untested here*: no LPIPS weights offline."""
    import lpips

    net = lpips.LPIPS(net="vgg", verbose=False).requires_grad_(False).eval()

    def decode(latents):
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        images = vae.decode((latents / vae.config.scaling_factor + shift).to(vae.dtype)).sample.float()
        images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        return torch.nn.functional.interpolate(images, size=(224, 224), mode="bilinear")

    def distance(online, target):
        net.to(online.device)
        return net(decode(online), decode(target).clamp(-1, 1)).flatten()

    return distance


def main(argv: list[str] | None = None) -> DiffusionPipeline | None:
    r"""Trains an ACT (or, with `--adversarial_weight 0`, a plain CT) student; returns its one-step pipeline."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args, act = parse_args((TrainingArguments, ACTArguments), argv)
    validate_training_args(args)
    if any(a.split("=")[0] == "--ema_decay" for a in argv):
        raise TrainingArgumentError("`--ema_decay`: ACT ties the EMA decay to N(k); set `--ema_decay_init` (mu0).")
    if act.mid_weight is not None and act.mid_weight > act.adversarial_weight:
        raise TrainingArgumentError(
            f"`--mid_weight` ({act.mid_weight}) must be <= `--adversarial_weight` ({act.adversarial_weight}): lambda "
            "grows from the grid's middle to its top (a larger mid weight would push lambda above 1)."
        )
    if act.bins_max < act.bins_min:
        raise TrainingArgumentError(f"`--bins_max` ({act.bins_max}) must be >= `--bins_min` ({act.bins_min}).")
    adversarial = act.adversarial_weight > 0
    if adversarial and args.train_batch_size % 4:
        raise TrainingArgumentError(
            f"`--train_batch_size` must be a multiple of 4 with `--adversarial_weight` > 0 (half for the student, a "
            f"quarter each for D's fakes and reals), got {args.train_batch_size}."
        )
    if not adversarial and any(a.split("=")[0].startswith(("--discriminator", "--r1", "--mid_weight")) for a in argv):
        raise TrainingArgumentError("discriminator / R1 / `--mid_weight` flags need `--adversarial_weight` > 0.")
    if act.distance == "lpips" and importlib.util.find_spec("lpips") is None:
        raise TrainingArgumentError("`--distance lpips` needs `pip install lpips` (and its VGG weights); or use the "
                                    "default `--distance pseudo_huber`.")  # fmt: skip
    args.use_ema = True  # the EMA is ACT's consistency target (and the saved student)
    build = _discriminator(act, args) if adversarial else None
    data = ImageCaptionDataset.from_args(args)  # columns checked before any model is loaded
    loss_fn = ACTLoss(
        adversarial_weight=act.adversarial_weight, mid_weight=act.mid_weight, r1_gamma=act.r1_gamma,
        r1_interval=act.r1_interval, huber_c=act.huber_c, rho=act.rho, bins_min=act.bins_min, bins_max=act.bins_max,
        ema_decay_init=act.ema_decay_init,
    )  # fmt: skip

    # Setup (shared): accelerator, teacher pipeline (VAE, text encoder), student (full or LoRA) and its EMA, the
    # discriminator as the run's critic (RAdam betas (0, 0.99 * 16 / 17), as the official code), resume, validation
    run = Distillation.setup(
        args, act, (TrainingArguments, ACTArguments), data.indices, critic=build,
        critic_learning_rate=act.discriminator_learning_rate, critic_betas=(args.adam_beta1, args.adam_beta2 * 16 / 17),
    )  # fmt: skip
    accelerator, teacher, n = run.accelerator, run.teacher, run.num_processes
    if act.distance == "lpips":
        loss_fn.distance = lpips_distance(teacher.vae)
    run.ema.update_after_step = -1  # mu(k) from the first update on (diffusers' EMAModel returns 0 on its first step)
    data.for_vae(teacher.vae.config.in_channels, run.latent_shape[1] * teacher.vae_scale_factor)
    prediction_type, acp = teacher.scheduler.config.prediction_type, run.alphas_cumprod
    student = Denoiser(run.student, acp, prediction_type)  # through the prepared (DDP) module: gradients
    plain = Denoiser(AdapterView(run.base_student, run.unets.student_adapter), acp, prediction_type)  # no-grad passes

    logs = {}
    for step in run.steps():
        bins = loss_fn.bins(step.global_step, args.max_train_steps)
        run.ema.decay = run.ema.min_decay = loss_fn.ema_decay(bins)  # mu(k), exactly (diffusers' warm-up bypassed)
        # Randomness of the global batch from (seed, micro-step); this rank keeps its slice, then splits it
        g, batch_size = step.generator, args.train_batch_size * n
        examples = rank_slice(next(run.batches), accelerator)
        flips, posterior = rank_slice(data.flips(batch_size, g), accelerator), run.global_noise(g)
        noise, fake_noise = run.global_noise(g), run.global_noise(g)
        index, fake_index, real_index = (rank_slice(loss_fn.sample_indices(batch_size, bins, g), accelerator)
                                         for _ in range(3))  # fmt: skip
        h = len(examples) // 2 if adversarial else len(examples)
        q = slice(h, h + (len(examples) - h) // 2), slice(h + (len(examples) - h) // 2, len(examples))

        with accelerator.accumulate(*run.models), accelerator.autocast():
            latents = encode_images(teacher.vae, data.pixels(examples, flips), posterior, run.dtype)
            cond = run.encode([data.captions[i] for i in examples])
            text = pooled_text(cond)
            part = slice_conditioning(cond, slice(0, h))
            # 1. student step on the first half: CT target from the EMA at n, online f at n + 1, same noise; the
            # adversarial term's gradient flows through the frozen D
            with torch.no_grad(), run.ema_weights():
                target, _ = loss_fn.consistency(plain, latents[:h], part, bins=bins, indices=index[:h] - 1,
                                                noise=noise[:h])  # fmt: skip
            with run.critic_frozen() if adversarial else torch.enable_grad():
                loss_g, step_logs = loss_fn.generator_loss(
                    student, run.critic_base, latents[:h], part, text[:h], target, bins=bins, indices=index[:h],
                    noise=noise[:h],
                )  # fmt: skip
                run.student.activate()  # gradient checkpointing re-runs the student's forward during backward
                run.update_student(loss_g.mean(), step, "loss_act")
            # 2. D step on the second half: fakes f(x_t, t) of the updated online student at fresh grid points, reals
            # the clean latents at independent grid points; lazy R1
            if adversarial:
                with torch.no_grad():
                    fake, _ = loss_fn.consistency(plain, latents[q[0]], slice_conditioning(cond, q[0]), bins=bins,
                                                  indices=fake_index[q[0]], noise=fake_noise[q[0]])  # fmt: skip
                loss_d, d_logs = loss_fn.discriminator_loss(
                    run.critic, fake, fake_index[q[0]], text[q[0]], latents[q[1]], real_index[q[1]], text[q[1]],
                    bins=bins, alphas_cumprod=acp, r1=step.global_step % act.r1_interval == 0,
                )  # fmt: skip
                run.update_critic(loss_d, step, "loss_discriminator")
                step_logs.update(d_logs)
        # 3. EMA (the next target) after both updates
        run.ema_step()
        step.logs.update(step_logs, lr=run.sched_student.get_last_lr()[0])
        logs = step.logs

    return run.finish(
        argv, script="training/train_act.py", logs=logs, method_name="ACT" if adversarial else "CT",
        paper="[ACT, arXiv 2311.14097](https://arxiv.org/abs/2311.14097)",
        hyperparameters={"adversarial_weight": act.adversarial_weight, "mid_weight": act.mid_weight,
                         "r1 (gamma, interval)": (act.r1_gamma, act.r1_interval), "bins": (act.bins_min, act.bins_max),
                         "ema_decay_init": act.ema_decay_init},
        tags=["consistency-training", "act" if adversarial else "ct"],
    )  # fmt: skip


if __name__ == "__main__":
    run_script(main)
