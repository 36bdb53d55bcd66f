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
from dataclasses import asdict, dataclass

import torch
from diffusers import DiffusionPipeline
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from diffusers_onestep.losses import Denoiser, PGSwiftBrushLoss, clamped_clip_loss, student_generate
from diffusers_onestep.schedulers import ConsistencyStudentScheduler
from diffusers_onestep.training_utils import (
    FAKE_SCORE_ADAPTER,
    AdapterView,
    NaNGuard,
    NegativePromptSampler,
    TrainingArguments,
    arg,
    backward_if_finite,
    build_distillation_unets,
    build_student_pipeline,
    check_weights,
    clip_embeddings,
    encode_prompts,
    format_command,
    load_clip,
    load_negative_prompts,
    load_teacher,
    load_training_prompts,
    log_validation,
    make_optimizer,
    optimizer_step,
    parse_args,
    prompt_batches,
    push_to_hub,
    rank_slice,
    register_checkpoint_hooks,
    resolve_max_train_steps,
    resume_from_checkpoint,
    run_script,
    save_checkpoint,
    save_model_card,
    save_student,
    secret_argument_names,
    setup_accelerator,
    student_nasa,
    teacher_latent_shape,
    training_loop,
    validate_training_args,
    weight_dtype,
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

    # Setup: accelerator, frozen teacher (SD 1.x / 2.x, SDXL or PixArt), student (full copy or LoRA) and LoRA fake
    # score, optimizers
    accelerator = setup_accelerator(args, find_unused_parameters=args.student_lora_rank > 0)
    device, dtype, n = accelerator.device, weight_dtype(accelerator), accelerator.num_processes
    resolve_max_train_steps(args, len(prompts), n)
    teacher = load_teacher(
        args.pretrained_teacher_model_name_or_path, revision=args.revision, variant=args.variant, dtype=dtype,
        device=device,
    )  # fmt: skip
    latent_shape = teacher_latent_shape(teacher, args.resolution)
    unets = build_distillation_unets(
        teacher.network, student_lora_rank=args.student_lora_rank, student_lora_alpha=args.student_lora_alpha,
        student_lora_target_modules=args.student_lora_target_modules, fake_score_lora_rank=pg.fake_score_lora_rank,
        fake_score_lora_alpha=pg.fake_score_lora_alpha, fake_score_lora_target_modules=pg.fake_score_lora_target_modules,
        gradient_checkpointing=args.gradient_checkpointing, dtype=dtype,
    )  # fmt: skip
    scheduler = ConsistencyStudentScheduler.from_config(
        teacher.scheduler.config, t_init=args.t_init, input_type=args.input_type
    )
    clip = load_clip(pg.clip_model_name_or_path, dtype=dtype, device=device) if pg.clip_model_name_or_path else None

    adam = {"betas": (args.adam_beta1, args.adam_beta2), "weight_decay": args.adam_weight_decay}
    adam.update(eps=args.adam_epsilon, use_8bit_adam=args.use_8bit_adam)
    opt_student = make_optimizer(unets.student_parameters, learning_rate=args.learning_rate, **adam)
    opt_fake = make_optimizer(unets.fake_score_parameters, learning_rate=pg.fake_score_learning_rate, **adam)
    schedules = [  # prepared schedules step once per process (diffusers' convention)
        get_scheduler(
            args.lr_scheduler,
            opt,
            num_warmup_steps=args.lr_warmup_steps * n,
            num_training_steps=args.max_train_steps * n,
        )
        for opt in (opt_student, opt_fake)
    ]
    models = [unets.student] if unets.shared else [unets.student, unets.teacher]
    *models, opt_student, opt_fake, sched_student, sched_fake = accelerator.prepare(
        *models, opt_student, opt_fake, *schedules
    )
    ema = EMAModel(unets.student_parameters, decay=args.ema_decay) if args.use_ema else None
    register_checkpoint_hooks(accelerator, ema)
    first_step = resume_from_checkpoint(accelerator, args.output_dir, args.resume_from_checkpoint)
    if accelerator.is_main_process:
        secret = set(secret_argument_names((TrainingArguments, PGSwiftBrushArguments)))
        config = {k: v for k, v in {**asdict(args), **asdict(pg)}.items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(args.tracker_project_name, config={k: v for k, v in config.items() if k not in secret})

    # The three roles as x0 / eps denoisers. Grad passes go through the prepared (DDP) modules; no-grad passes use
    # the unwrapped base. With a LoRA student all views are one network with adapters switched. Prompts become
    # conditioning dicts through the teacher pipeline's own encode_prompt (its unconditional branch included).
    base_student, base_teacher = accelerator.unwrap_model(models[0]), accelerator.unwrap_model(models[-1])
    student = AdapterView(models[0], unets.student_adapter, base=base_student)
    acp, prediction_type = teacher.scheduler.alphas_cumprod.to(device), teacher.scheduler.config.prediction_type
    teacher_score = Denoiser(AdapterView(base_teacher, None), acp, prediction_type)
    fake_score = Denoiser(AdapterView(base_teacher, FAKE_SCORE_ADAPTER), acp, prediction_type)
    fake_score_train = Denoiser(AdapterView(models[-1], FAKE_SCORE_ADAPTER, base=base_teacher), acp, prediction_type)
    encoding = {"device": device, "dtype": dtype, "resolution": args.resolution}
    uncond = encode_prompts(teacher, [""], unconditional=True, **encoding)

    def student_pipeline() -> DiffusionPipeline:
        AdapterView(base_student, unets.student_adapter).activate()
        pipe = build_student_pipeline(teacher.pipeline, base_student, scheduler, teacher.backbone)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def validate(step: int) -> list[str]:
        with accelerator.autocast():
            _, path = log_validation(
                student_pipeline(), prompts=args.validation_prompts, accelerator=accelerator, step=step,
                output_dir=args.output_dir, seed=args.seed, num_images_per_prompt=args.num_validation_images,
                **teacher.generation_kwargs(latent_shape),
            )  # fmt: skip
        return [path]

    trainable = unets.student_parameters + unets.fake_score_parameters
    batches = prompt_batches(
        prompts, args.train_batch_size * n, args.seed, start=first_step * args.gradient_accumulation_steps
    )

    def checkpoint(step: int) -> None:
        save_checkpoint(accelerator, args.output_dir, step, args.checkpoints_total_limit, trainable)

    nan_guard, logs = NaNGuard(args.nan_policy, args.max_nan_skips, args.nan_skip_window), {}
    for step in training_loop(
        accelerator, args, first_step, checkpoint, validate if args.validation_prompts else None
    ):
        # Randomness of the global batch from (seed, micro-step); this rank keeps its slice
        g, batch_size = step.generator, args.train_batch_size * n
        z = rank_slice(torch.randn(batch_size, *latent_shape, generator=g), accelerator).to(device)
        eps = rank_slice(torch.randn(batch_size, *latent_shape, generator=g), accelerator).to(device)
        t = rank_slice(torch.randint(pg.min_timestep, pg.max_timestep + 1, (batch_size,), generator=g), accelerator)
        k = rank_slice(loss_fn.sample_guidance_scale(batch_size, generator=g), accelerator)
        eps_fake = rank_slice(torch.randn(batch_size, *latent_shape, generator=g), accelerator).to(device)
        t_fake = rank_slice(torch.randint(0, len(acp), (batch_size,), generator=g), accelerator)
        drop = rank_slice(torch.rand(batch_size, generator=g) < pg.uncond_prob, accelerator)
        batch_prompts = rank_slice(next(batches), accelerator)
        if negatives is not None:  # NASA-T: one negative per sample, one alpha ~ U(0, 1) per iteration
            negative_prompts, alpha = negatives.sample(batch_size, generator=g)
            negative_prompts = rank_slice(negative_prompts, accelerator)

        with accelerator.accumulate(*models), accelerator.autocast():
            cond = encode_prompts(teacher, batch_prompts, **encoding)
            negative = encode_prompts(teacher, negative_prompts, **encoding) if negatives is not None else None
            nasa = student_nasa(student, negative, alpha) if negatives is not None else nullcontext
            # 1. x0 = G(z, c): the student's one step at t_init (NASA-T: with NASA on the negative at alpha)
            with nasa():
                x0 = student_generate(student, scheduler, z, cond)
            # 2. x_t = a_t x0 + s_t eps, t ~ U{t_min..t_max}; teacher and fake score both guided with k ~ U(k_min, k_max)
            # (NASA-T: the teacher's unconditional branch is the negative, the fake score's the empty prompt)
            # 3. student loss: gradient w(t) (e_teacher - e_fake) on x0, w(t) = s_t^2
            loss_g, logs_g = loss_fn.generator_loss(
                teacher_score, fake_score, x0, cond, uncond, noise=eps, timesteps=t, guidance_scale=k,
                negative_prompt_embeds=negative,
            )  # fmt: skip
            if clip is not None:  # optional clamped CLIP loss on the decoded image, weight decayed linearly to 0
                image = teacher.vae.decode(x0.to(dtype) / teacher.vae.config.scaling_factor).sample
                loss_clip = clamped_clip_loss(*clip_embeddings(*clip, image, batch_prompts), pg.clip_loss_tau).mean()
                loss_g = loss_g + pg.clip_loss_weight * (1 - step.global_step / args.max_train_steps) * loss_clip
                logs_g["loss_clip"] = loss_clip.detach()
            student.activate()  # gradient checkpointing re-runs the student's forward (with NASA-T's NASA) in backward
            with nasa():
                backward_if_finite(accelerator, loss_g, step.global_step, nan_guard, "loss_student")
            optimizer_step(
                accelerator, opt_student, sched_student, unets.student_parameters, args.max_grad_norm,
                step.global_step, nan_guard,
            )  # fmt: skip
            # 4. fake-score loss on stopgrad(x0): t ~ U{0..T-1}, empty prompt with probability 0.1
            loss_f, logs_f = loss_fn.fake_score_loss(
                fake_score_train, x0, cond, uncond, noise=eps_fake, timesteps=t_fake, uncond_mask=drop
            )
            backward_if_finite(accelerator, loss_f, step.global_step, nan_guard, "loss_fake_score")
            optimizer_step(
                accelerator, opt_fake, sched_fake, unets.fake_score_parameters, args.max_grad_norm,
                step.global_step, nan_guard,
            )  # fmt: skip
        # 5. alternate 1:1 (student update, then fake-score update); EMA of the student after its update
        if accelerator.sync_gradients and ema is not None:
            ema.step(unets.student_parameters)
        step.logs.update(logs_g, **logs_f, lr=sched_student.get_last_lr()[0])
        if negatives is not None:
            step.logs["nasa_scale"] = alpha
        logs = step.logs

    # Final save: the student pipeline's directory or LoRA weights + scheduler, model card, optional Hub upload
    accelerator.wait_for_everyone()
    pipeline = None
    if accelerator.is_main_process:
        if ema is not None:
            ema.copy_to(unets.student_parameters)
        check_weights(None, unets.student_parameters, "the final model")
        save_student(
            args.output_dir, network=base_student, scheduler=scheduler, teacher=teacher,
            adapter_name=unets.student_adapter, teacher_name_or_path=args.pretrained_teacher_model_name_or_path,
            revision=args.revision, variant=args.variant,
        )  # fmt: skip
        images = validate(args.max_train_steps) if args.validation_prompts else []
        repo_id = args.hub_model_id or args.output_dir.rstrip("/").split("/")[-1]
        hyperparameters = {k: getattr(args, k) for k in ("train_batch_size", "learning_rate", "max_train_steps")}
        hyperparameters.update(fake_score_learning_rate=pg.fake_score_learning_rate, guidance_scale=guidance_range)
        if negatives is not None:
            hyperparameters.update(nasa_t_negative_prompts=len(negatives.prompts), nasa_t_scale_range=nasa_range)
        method = "PG-SwiftBrush" if pg.fixed_guidance_scale is None else "SwiftBrush (fixed guidance)"
        save_model_card(
            args.output_dir, base_model=args.hub_base_model or args.pretrained_teacher_model_name_or_path,
            method_name=method + (" with NASA-T (negative prompts in training)" if negatives is not None else ""),
            paper="[SNOOPI, arXiv 2412.02687](https://arxiv.org/abs/2412.02687)",
            script="training/train_pg_swiftbrush.py", command=format_command(argv, "training/train_pg_swiftbrush.py"),
            metrics={k: float(v) for k, v in logs.items()}, hyperparameters=hyperparameters, t_init=args.t_init,
            input_type=args.input_type, lora_rank=args.student_lora_rank, lora_alpha=args.student_lora_alpha,
            repo_id=repo_id, validation_images=images, secrets=[args.hub_token],
            tags=["pg-swiftbrush", "snoopi", *(["nasa-t"] if negatives is not None else [])],
            pipeline_class=teacher.backbone.student_pipeline.__name__,
            **({"example_prompt": args.validation_prompts[0]} if args.validation_prompts else {}),
        )  # fmt: skip
        if args.push_to_hub:
            push_to_hub(
                args.output_dir, repo_id=repo_id, token=args.hub_token, private=args.hub_private,
                ignore_patterns=["checkpoint-*", ".*", f"{args.logging_dir}/*"], timeout=args.hub_timeout,
                retries=args.hub_retries,
            )  # fmt: skip
        pipeline = student_pipeline()
    accelerator.end_training()
    return pipeline


if __name__ == "__main__":
    run_script(main)
