#!/usr/bin/env python
"""PG-SwiftBrush: data-free one-step distillation with proper guidance (SNOOPI, arXiv 2412.02687).

Variational score distillation with three roles: the one-step student `G`, the frozen teacher and a LoRA fake score on
the teacher's UNet. The teacher and the fake score use the **same** per-sample guidance scale `k ~ U(k_min, k_max)`
(`--fixed_guidance_scale` gives the SwiftBrush baseline). Only prompts are needed. The losses live in
`diffusers_onestep.losses.vsd`; the plumbing in `diffusers_onestep.training_utils`; this file reads top to bottom.

    accelerate launch training/train_pg_swiftbrush.py --preset sd21-pgsb \
        --train_prompts prompts.txt --output_dir sd21-pgsb --validation_prompts "a photo of a cat"

NASA-T (SNOOPI v3): `--negative_prompts negatives.txt` (one per line). Each iteration draws one negative per sample;
the teacher's CFG uses it as its unconditional branch (the fake score keeps the empty prompt) and the student runs with
NASA on it at `alpha ~ U(0, 1)`, one draw per iteration (`diffusers_onestep.training_utils.negatives` says what the
paper leaves unspecified). Add `--student_lora_rank 64` for a LoRA student (teacher, fake score and student then share
one frozen UNet; its learning rate then defaults to 1e-4). For `--push_to_hub`, log in with `hf auth login` or set
`HF_TOKEN`.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline

from diffusers_onestep.losses import PGSwiftBrushLoss, clamped_clip_loss, student_generate
from diffusers_onestep.training_utils import (
    Distillation,
    NegativePromptSampler,
    TrainingArguments,
    arg,
    clip_embeddings,
    load_clip,
    load_negative_prompts,
    load_training_prompts,
    parse_args,
    rank_slice,
    run_script,
    student_nasa,
    validate_training_args,
)


__all__ = ["PGSwiftBrushArguments", "main"]


@dataclass
class PGSwiftBrushArguments:
    r"""PG-SB's own hyperparameters (METHODS.md section 2); defaults are the paper's for SD1.5 / SD2.1."""

    fake_score_learning_rate: float = arg(1e-3, "Fake-score LoRA learning rate.", low=0, low_open=True)
    fake_score_lora_rank: int = arg(64, "Fake-score LoRA rank.", low=1)
    fake_score_lora_alpha: int = arg(128, "Fake-score LoRA alpha.", low=1)
    fake_score_lora_target_modules: str = arg("to_q,to_k,to_v,to_out.0", "Comma-separated modules it adapts.")
    guidance_scale_min: float = arg(0.5, "k_min of k ~ U(k_min, k_max).", low=0)
    guidance_scale_max: float = arg(4.0, "k_max (PixArt: 3).", low=0)
    fixed_guidance_scale: float | None = arg(None, "SwiftBrush baseline: one fixed k (>= 0).", low=0)
    min_timestep: int = arg(20, "Smallest t of the student loss.", low=0, high=999)
    max_timestep: int = arg(980, "Largest t of the student loss.", low=0, high=999)
    uncond_prob: float = arg(0.1, "Empty-prompt rate of the fake-score loss.", low=0, high=1)
    clip_model_name_or_path: str | None = arg(None, "Enables the clamped CLIP loss (a CLIPModel).", path="model")
    clip_loss_weight: float = arg(0.1, "Its weight, decayed linearly to 0.", low=0)
    clip_loss_tau: float = arg(0.37, "Its clamp tau.", low=-1, high=1)
    negative_prompts: str | None = arg(None, "NASA-T: a text file of negative prompts, one per line.")
    nasa_scale_min: float = arg(0.0, "NASA-T: alpha ~ U(min, max), one draw per iteration.", low=0)
    nasa_scale_max: float = arg(1.0, "NASA-T: its max (SNOOPI v3: U(0, 1)).", low=0)


def main(argv: list[str] | None = None) -> DiffusionPipeline | None:
    r"""
    Trains a PG-SB student; returns it on the main process as its backbone's student pipeline (`OneStepPipeline`,
    `OneStepXLPipeline` or `OneStepPixArtPipeline`).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args, pg = parse_args((TrainingArguments, PGSwiftBrushArguments), argv)
    validate_training_args(args)
    guidance_range = (pg.guidance_scale_min, pg.guidance_scale_max)
    loss_fn = PGSwiftBrushLoss(
        guidance_scale_range=guidance_range, fixed_guidance_scale=pg.fixed_guidance_scale, guide_fake_score=True,
        min_timestep=pg.min_timestep, max_timestep=pg.max_timestep, uncond_prob=pg.uncond_prob,
    )  # fmt: skip
    prompts = load_training_prompts(args)
    nasa_range = (pg.nasa_scale_min, pg.nasa_scale_max)  # NASA-T: negatives and alpha range checked before any work
    negatives = None if pg.negative_prompts is None else NegativePromptSampler(
        load_negative_prompts(pg.negative_prompts), nasa_range
    )  # fmt: skip

    # Setup (shared by every distillation script, `training_utils.distillation`): accelerator, frozen teacher (SD
    # 1.x / 2.x, SDXL or PixArt), student (full copy or LoRA), LoRA fake score on the shared frozen base, optimizers,
    # EMA, resume, the three roles as denoisers, validation and checkpointing
    run = Distillation.setup(
        args, pg, (TrainingArguments, PGSwiftBrushArguments), prompts, fake_score_learning_rate=pg.fake_score_learning_rate,
        fake_score_lora_rank=pg.fake_score_lora_rank, fake_score_lora_alpha=pg.fake_score_lora_alpha,
        fake_score_lora_target_modules=pg.fake_score_lora_target_modules,
    )  # fmt: skip
    accelerator, device, student, scheduler = run.accelerator, run.device, run.student, run.scheduler
    clip = load_clip(pg.clip_model_name_or_path, dtype=run.dtype, device=device) if pg.clip_model_name_or_path else None

    logs = {}
    for step in run.steps():
        # Randomness of the global batch from (seed, micro-step); this rank keeps its slice
        g, batch_size = step.generator, args.train_batch_size * run.num_processes
        z, eps = run.global_noise(g), run.global_noise(g)
        t = rank_slice(torch.randint(pg.min_timestep, pg.max_timestep + 1, (batch_size,), generator=g), accelerator)
        k = rank_slice(loss_fn.sample_guidance_scale(batch_size, generator=g), accelerator)
        eps_fake = run.global_noise(g)
        t_fake = rank_slice(torch.randint(0, len(run.alphas_cumprod), (batch_size,), generator=g), accelerator)
        drop = rank_slice(torch.rand(batch_size, generator=g) < pg.uncond_prob, accelerator)
        batch_prompts = rank_slice(next(run.batches), accelerator)
        if negatives is not None:  # NASA-T: one negative per sample, one alpha ~ U(0, 1) per iteration
            negative_prompts, alpha = negatives.sample(batch_size, generator=g)
            negative_prompts = rank_slice(negative_prompts, accelerator)

        with accelerator.accumulate(*run.models), accelerator.autocast():
            cond = run.encode(batch_prompts)
            negative = run.encode(negative_prompts) if negatives is not None else None
            nasa = student_nasa(student, negative, alpha) if negatives is not None else nullcontext
            # 1. x0 = G(z, c): the student's one step at t_init (NASA-T: with NASA on the negative at alpha)
            with nasa():
                x0 = student_generate(student, scheduler, z, cond)
            # 2. x_t = a_t x0 + s_t eps, t ~ U{t_min..t_max}; teacher and fake score both guided with k ~ U(k_min, k_max)
            # (NASA-T: the teacher's unconditional branch is the negative, the fake score's the empty prompt)
            # 3. student loss: gradient w(t) (e_teacher - e_fake) on x0, w(t) = s_t^2
            loss_g, logs_g = loss_fn.generator_loss(
                run.teacher_score, run.fake_score, x0, cond, run.uncond, noise=eps, timesteps=t, guidance_scale=k,
                negative_prompt_embeds=negative,
            )  # fmt: skip
            if clip is not None:  # optional clamped CLIP loss on the decoded image, weight decayed linearly to 0
                vae = run.teacher.vae
                image = vae.decode(x0.to(run.dtype) / vae.config.scaling_factor).sample
                loss_clip = clamped_clip_loss(*clip_embeddings(*clip, image, batch_prompts), pg.clip_loss_tau).mean()
                loss_g = loss_g + pg.clip_loss_weight * (1 - step.global_step / args.max_train_steps) * loss_clip
                logs_g["loss_clip"] = loss_clip.detach()
            student.activate()  # gradient checkpointing re-runs the student's forward (with NASA-T's NASA) in backward
            run.update_student(loss_g, step, during_backward=nasa)
            # 4. fake-score loss on stopgrad(x0): t ~ U{0..T-1}, empty prompt with probability 0.1
            loss_f, logs_f = loss_fn.fake_score_loss(
                run.fake_score_train, x0, cond, run.uncond, noise=eps_fake, timesteps=t_fake, uncond_mask=drop
            )
            run.update_fake_score(loss_f, step)
        # 5. alternate 1:1 (student update, then fake-score update); EMA of the student after its update
        run.ema_step()
        step.logs.update(logs_g, **logs_f, lr=run.sched_student.get_last_lr()[0])
        if negatives is not None:
            step.logs["nasa_scale"] = alpha
        logs = step.logs

    # Final save: the student pipeline's directory or LoRA weights + scheduler, model card, optional Hub upload
    hyperparameters = {"fake_score_learning_rate": pg.fake_score_learning_rate, "guidance_scale": guidance_range}
    if negatives is not None:
        hyperparameters.update(nasa_t_negative_prompts=len(negatives.prompts), nasa_t_scale_range=nasa_range)
    method = "PG-SwiftBrush" if pg.fixed_guidance_scale is None else "SwiftBrush (fixed guidance)"
    return run.finish(
        argv, script="training/train_pg_swiftbrush.py", logs=logs, hyperparameters=hyperparameters,
        method_name=method + (" with NASA-T (negative prompts in training)" if negatives is not None else ""),
        paper="[SNOOPI, arXiv 2412.02687](https://arxiv.org/abs/2412.02687)",
        tags=["pg-swiftbrush", "snoopi", *(["nasa-t"] if negatives is not None else [])],
    )  # fmt: skip


if __name__ == "__main__":
    run_script(main)
