#!/usr/bin/env python
"""SiD / SiD-LSG: Score identity Distillation of a text-to-image teacher into a one-step generator, data-free.

Zhou et al., "Score identity Distillation", ICML 2024 (arXiv 2404.04057), and its guided text-to-image form SiD-LSG
(ICLR 2025, arXiv 2406.01561); METHODS.md section 4. Three networks: the frozen teacher `f_phi`, the fake score
`f_psi` (a full trainable copy of the teacher by default, as the paper; `--fake_score_lora_rank 64` makes it a LoRA
adapter on the shared frozen base, our memory mode) and the generator `G` (full or `--student_lora_rank`), both
initialised from the teacher. Each iteration alternates 1:1, fake score first, as the official loop
(`mingyuanzhou/SiD-LSG`, `training/sid_training_loop.py`). The losses live in `diffusers_onestep.losses.sid`; the
set-up, checkpointing, validation and saving in `diffusers_onestep.training_utils.Distillation`.

    accelerate launch training/train_sid.py --preset sd15-sid-lsg \
        --train_prompts prompts.txt --output_dir sd15-sid-lsg --validation_prompts "a photo of a cat"

`--guidance_scale k` is LSG (all four guidance scales equal; 1.5 best FID, 4.5 best CLIP on SD1.5); set
`--guidance_scale_teacher` etc. to part them. The generator loss does not converge to a number (it oscillates around 0
at alpha 1): judge checkpoints by validation images and FID.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline

from diffusers_onestep.losses import SiDLoss, student_generate
from diffusers_onestep.models.backbones import expand_conditioning, where_conditioning
from diffusers_onestep.training_utils import (
    Distillation,
    TrainingArguments,
    arg,
    load_training_prompts,
    parse_args,
    rank_slice,
    run_script,
    validate_training_args,
)


__all__ = ["SiDArguments", "main"]


@dataclass
class SiDArguments:
    r"""SiD's own hyperparameters (METHODS.md section 4); defaults are SiD-LSG's official ones for Stable Diffusion."""

    alpha: float = arg(1.0, "SiD's alpha (1.0 for SD / LSG, 1.2 for SiD on EDM).", low=0)
    guidance_scale: float = arg(1.5, "LSG: kappa_1 = kappa_2 = kappa_3 = kappa_4 (1.5 best FID, 4.5 best CLIP).", low=0)
    guidance_scale_train_fake: float | None = arg(None, "kappa_1, the fake score's trained CFG (default: LSG's).", low=0)
    guidance_scale_fake: float | None = arg(None, "kappa_2 = kappa_3, the fake score in G's loss (default: LSG's).",
                                            low=0)  # fmt: skip
    guidance_scale_teacher: float | None = arg(None, "kappa_4, the teacher's CFG (default: LSG's).", low=0)
    fake_score_learning_rate: float = arg(1e-6, "Fake-score learning rate (SiD-LSG: 1e-6, as G's).", low=0,
                                          low_open=True)  # fmt: skip
    fake_score_lora_rank: int = arg(0, "0: the fake score is a full trainable copy (the paper); > 0: a LoRA.", low=0)
    fake_score_lora_alpha: int | None = arg(None, "Its LoRA alpha (default: the rank).", low=1)
    fake_score_lora_target_modules: str = arg("to_q,to_k,to_v,to_out.0", "Modules its LoRA adapts.")
    min_timestep: int = arg(20, "Smallest t of both losses (official 20).", low=0, high=999)
    max_timestep: int = arg(979, "Largest t of both losses (official randint(20, 980): 979).", low=0, high=999)
    uncond_prob: float = arg(0.1, "Prompt dropout of the fake-score step when it is guided.", low=0, high=1)
    loss_scaling: float = arg(1.0, "Multiplies both losses (SiD-LSG 1; SiD on EDM 100 for G).", low=0, low_open=True)


def main(argv: list[str] | None = None) -> DiffusionPipeline | None:
    r"""
    Trains a SiD / SiD-LSG student; returns it on the main process as its backbone's student pipeline
    (`OneStepPipeline`, `OneStepXLPipeline` or `OneStepPixArtPipeline`).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args, sid = parse_args((TrainingArguments, SiDArguments), argv)
    validate_training_args(args)
    if sid.min_timestep > sid.max_timestep:
        raise ValueError(f"`--min_timestep` ({sid.min_timestep}) must be <= `--max_timestep` ({sid.max_timestep}).")
    kappa = [sid.guidance_scale if k is None else k for k in
             (sid.guidance_scale_train_fake, sid.guidance_scale_fake, sid.guidance_scale_teacher)]  # fmt: skip
    loss_fn = SiDLoss(
        alpha=sid.alpha, guidance_scale_train_fake=kappa[0], guidance_scale_fake=kappa[1],
        guidance_scale_teacher=kappa[2], min_timestep=sid.min_timestep, max_timestep=sid.max_timestep,
        uncond_prob=sid.uncond_prob, loss_scaling=sid.loss_scaling,
    )  # fmt: skip
    prompts = load_training_prompts(args)

    # Setup (shared, `training_utils.Distillation`): accelerator, frozen teacher, generator G (full or LoRA), fake
    # score f_psi (full copy or LoRA), optimizers (Adam betas (0, 0.999) by the presets), EMA, resume, validation
    run = Distillation.setup(
        args, sid, (TrainingArguments, SiDArguments), prompts, fake_score_learning_rate=sid.fake_score_learning_rate,
        fake_score_lora_rank=sid.fake_score_lora_rank, fake_score_lora_alpha=sid.fake_score_lora_alpha,
        fake_score_lora_target_modules=sid.fake_score_lora_target_modules,
    )  # fmt: skip
    accelerator, student, scheduler = run.accelerator, run.student, run.scheduler

    logs = {}
    for step in run.steps():
        # Randomness of the global batch from (seed, micro-step); this rank keeps its slice
        g, batch_size = step.generator, args.train_batch_size * run.num_processes
        timesteps = (sid.min_timestep, sid.max_timestep + 1, (batch_size,))
        z_fake, eps_fake = run.global_noise(g), run.global_noise(g)
        t_fake = rank_slice(torch.randint(*timesteps, generator=g), accelerator)
        drop = rank_slice(loss_fn.sample_uncond_mask(batch_size, generator=g), accelerator)
        z, eps = run.global_noise(g), run.global_noise(g)
        t = rank_slice(torch.randint(*timesteps, generator=g), accelerator)
        batch_prompts = rank_slice(next(run.batches), accelerator)

        with accelerator.accumulate(*run.models), accelerator.autocast():
            cond = run.encode(batch_prompts)
            # 1. x_g = sg(G(z, c)): with LSG the prompt is dropped (p 0.1) *before* G generates, as the official loop
            cond_fake = where_conditioning(drop.to(run.device), expand_conditioning(run.uncond, len(drop)), cond)
            with torch.no_grad():
                x_fake = student_generate(student, scheduler, z_fake, cond_fake)
            # 2. fake-score step: denoising score matching of f_psi (kappa_1-guided eps) on x_t = a_t x_g + s_t eps
            loss_f, logs_f = loss_fn.fake_score_loss(
                run.fake_score_train, x_fake, cond, run.uncond, noise=eps_fake, timesteps=t_fake, uncond_mask=drop
            )
            run.update_fake_score(loss_f, step)
            # 3. x_g = G(z, c) with gradient (no prompt dropout for G's step)
            x_g = student_generate(student, scheduler, z, cond)
            # 4. generator step: y_real = x0 of f_phi (kappa_4), y_fake = x0 of f_psi (kappa_2), no stop-gradient on
            # either (only w is detached); L = w (y_real - y_fake)^T [(y_real - x_g) - alpha (y_real - y_fake)]. The
            # fake score is frozen for this step so that only G's parameters get a gradient
            with run.fake_score_frozen():
                loss_g, logs_g = loss_fn.generator_loss(
                    run.teacher_score, run.fake_score, x_g, cond, run.uncond, noise=eps, timesteps=t
                )
                student.activate()  # gradient checkpointing re-runs the student's forward during backward
                run.update_student(loss_g, step, "loss_sid")
        # 5. EMA of G after its update
        run.ema_step()
        step.logs.update(logs_g, **logs_f, lr=run.sched_student.get_last_lr()[0])
        logs = step.logs

    # Final save: the student pipeline's directory or LoRA weights + scheduler, model card, optional Hub upload
    lsg = len(set(kappa)) == 1
    return run.finish(
        argv, script="training/train_sid.py", logs=logs,
        method_name="SiD-LSG" if lsg and kappa[0] != 1 else "SiD",
        paper="[SiD, arXiv 2404.04057](https://arxiv.org/abs/2404.04057); [SiD-LSG, arXiv 2406.01561]"
        "(https://arxiv.org/abs/2406.01561)",
        hyperparameters={"alpha": sid.alpha, "guidance_scales (kappa_1, kappa_2 = kappa_3, kappa_4)": tuple(kappa),
                         "fake_score_learning_rate": sid.fake_score_learning_rate,
                         "fake_score": "LoRA" if sid.fake_score_lora_rank else "full copy"},
        tags=["sid", *(["sid-lsg"] if lsg else [])],
    )  # fmt: skip


if __name__ == "__main__":
    run_script(main)
