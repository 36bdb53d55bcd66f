#!/usr/bin/env python
"""ECT / SCT: (Stable) Consistency Tuning of a pretrained text-to-image teacher on real image-caption data.

Geng et al., "Consistency Models Made Easy" (ECT, arXiv 2406.14548, official code `locuslab/ect`) and Wang, Geng and Li,
"Stable Consistency Tuning" (SCT, arXiv 2410.18958, no public code); METHODS.md section 5. One network: the student,
initialised from the teacher (full copy or `--student_lora_rank` LoRA), is tuned so that `f(x_t, t) = f(x_r, r)` along
the teacher's VP schedule, with the target `sg(f(x_r, r))` from the *current* weights (no teacher pass, no fake score).
`--method ect` builds `x_r` from the same noise as `x_t`; `--method sct` replaces that noise by the stable-target-field
estimate over `--stf_reference_size` images of the same caption (the variance-reduced target). The gap `t - r` halves
every `--double_every` optimizer steps (ECT's recipe: 8 stages over the run). The loss lives in
`diffusers_onestep.losses.consistency`; set-up, checkpoints, EMA, validation and saving in
`diffusers_onestep.training_utils.Distillation`; the images in `training_utils.ImageCaptionDataset`.

    accelerate launch training/train_sct.py --preset sd15-sct --train_data_dir my_imagefolder \
        --output_dir sd15-sct --validation_prompts "a photo of a cat"

The saved student is a one-step pipeline whose `ConsistencyStudentScheduler` starts at `t_init` 999 from pure noise
and carries `mid_timestep` (the VP timestep of `--mid_sigma`), so `num_inference_steps=2` runs ECT's two-step sampler.
*Not implemented* (SCT, paper text only): multistep (phased) consistency training and edge-skipping sampling.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import DiffusionPipeline

from diffusers_onestep.losses import ConsistencyTuningLoss, Denoiser
from diffusers_onestep.models import sigma_to_timestep
from diffusers_onestep.schedulers import ConsistencyStudentScheduler
from diffusers_onestep.training_utils import (
    AdapterView,
    Distillation,
    ImageCaptionDataset,
    TrainingArgumentError,
    TrainingArguments,
    arg,
    encode_images,
    parse_args,
    rank_slice,
    run_script,
    validate_training_args,
)


__all__ = ["SCTArguments", "main", "set_dropout"]


@dataclass
class SCTArguments:
    r"""ECT / SCT hyperparameters (METHODS.md section 5); defaults follow ECT's CIFAR-10 recipe (`run_ecm.sh`)."""

    method: Literal["ect", "sct"] = arg("sct", "'ect': shared-noise target; 'sct': SCT's variance-reduced target.")
    P_mean: float = arg(-1.1, "Mean of log sigma (EDM sigma; ECT -1.1).", low=-20, high=20)
    P_std: float = arg(2.0, "Std of log sigma (ECT 2.0).", low=0, high=20, low_open=True)
    q: float = arg(2.0, "The gap t - r shrinks by this factor every stage (ECT: 2; its ImageNet branch 4).", low=1,
                   low_open=True)  # fmt: skip
    k: float = arg(8.0, "ECT's r rule: r = t (1 - (1 + k sigmoid(-b t)) / q^(stage+1)).", low=0)
    b: float = arg(1.0, "ECT's r rule's b.", low=0)
    double_every: int | None = arg(None, "Optimizer steps per stage (default: max_train_steps / 8, ECT's recipe).",
                                   low=1)  # fmt: skip
    huber_c: float = arg(0.0, "Pseudo-Huber c (0: the L2 norm, ECT CIFAR; 0.06 ECT ImageNet).", low=0)
    weighting: Literal["inv_dt", "snr_plus_k"] = arg("inv_dt", "1 / (t - r) (ECT CIFAR) or 1/t^2 + 1/sigma_data^2.")
    sigma_data: float | None = arg(None, "sigma_data of the 'snr_plus_k' weighting (default 0.5).", low=0,
                                   low_open=True)  # fmt: skip
    dropout: float = arg(0.2, "Dropout of the student's residual blocks in training (ECT CIFAR 0.2).", low=0, high=1,
                         high_open=True)  # fmt: skip
    mid_sigma: float = arg(0.821, "EDM sigma of the two-step sampler's second step (ECT 0.821).", low=0,
                           low_open=True)  # fmt: skip
    stf_reference_size: int | None = arg(
        None, "SCT: same-caption images per sample in the reference batch (default 8; 0: ECT's target).", low=0
    )


def set_dropout(network: torch.nn.Module, p: float) -> int:
    r"""Sets `p` on the residual blocks' dropouts (every `nn.Dropout` where there are none, e.g. a DiT); returns how many."""
    dropouts = [m.dropout for m in network.modules() if isinstance(getattr(m, "dropout", None), torch.nn.Dropout)
                and hasattr(m, "conv1")]  # fmt: skip
    dropouts = dropouts or [m for m in network.modules() if isinstance(m, torch.nn.Dropout)]
    for module in dropouts:
        module.p = p
    return len(dropouts)


def main(argv: list[str] | None = None) -> DiffusionPipeline | None:
    r"""Tunes an ECT / SCT student; returns it on the main process as its backbone's one-step pipeline."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args, ct = parse_args((TrainingArguments, SCTArguments), argv)
    validate_training_args(args)
    if ct.method == "ect" and ct.stf_reference_size is not None:
        raise TrainingArgumentError("`--stf_reference_size` is an SCT setting: pass it with `--method sct` only.")
    if ct.weighting != "snr_plus_k" and ct.sigma_data is not None:
        raise TrainingArgumentError("`--sigma_data` is used only by `--weighting snr_plus_k`.")
    references = (8 if ct.stf_reference_size is None else ct.stf_reference_size) if ct.method == "sct" else 0
    data = ImageCaptionDataset.from_args(args)  # columns checked before any model is loaded
    loss_fn = ConsistencyTuningLoss(
        P_mean=ct.P_mean, P_std=ct.P_std, q=ct.q, k=ct.k, b=ct.b, c=ct.huber_c, weighting=ct.weighting,
        sigma_data=ct.sigma_data or 0.5, target="stf" if references else "ect",
    )  # fmt: skip

    # Setup (shared): accelerator, the teacher pipeline (VAE, text encoder), the student (full or LoRA), its optimizer,
    # EMA, resume, validation; no fake score
    run = Distillation.setup(args, ct, (TrainingArguments, SCTArguments), data.indices)
    accelerator, teacher, n = run.accelerator, run.teacher, run.num_processes
    double_every = ct.double_every or max(1, args.max_train_steps // 8)
    data.for_vae(teacher.vae.config.in_channels, run.latent_shape[1] * teacher.vae_scale_factor)
    mid = int(sigma_to_timestep(teacher.scheduler.alphas_cumprod, torch.tensor([ct.mid_sigma])).round())
    run.scheduler = ConsistencyStudentScheduler.from_config(run.scheduler.config, mid_timestep=min(mid, args.t_init - 1))
    set_dropout(run.base_student, ct.dropout)
    run.base_student.train()  # dropout on (a LoRA student's shared network is never used as the teacher here)
    prediction_type, acp = teacher.scheduler.config.prediction_type, run.alphas_cumprod
    student = Denoiser(run.student, acp, prediction_type)  # through the prepared (DDP) module: gradients
    target = Denoiser(AdapterView(run.base_student, run.unets.student_adapter), acp, prediction_type)  # no-grad pass

    logs = {}
    for step in run.steps():
        loss_fn.stage = step.global_step // double_every
        # Randomness of the global batch from (seed, micro-step); this rank keeps its slice
        g, batch_size = step.generator, args.train_batch_size * n
        indices = next(run.batches)
        flips, posterior = rank_slice(data.flips(batch_size, g), accelerator), run.global_noise(g)
        sigmas, noise = rank_slice(loss_fn.sample_sigmas(batch_size, g), accelerator), run.global_noise(g)
        ref_rows = data.references(indices, references, g)  # (global batch, R), drawn whatever the method
        ref_flips = data.flips(batch_size * references, g)
        ref_noise = torch.randn(batch_size * references, *run.latent_shape, generator=g)
        indices, ref_rows = rank_slice(indices, accelerator), rank_slice(ref_rows, accelerator).flatten()

        with accelerator.accumulate(*run.models), accelerator.autocast():
            latents = encode_images(teacher.vae, data.pixels(indices, flips), posterior, run.dtype)
            cond = run.encode([data.captions[i] for i in indices])
            stf = {}
            if references:  # SCT's reference batch: the batch itself plus R same-caption images per sample
                ref_latents = encode_images(
                    teacher.vae, data.pixels(ref_rows.tolist(), rank_slice(ref_flips, accelerator)),
                    rank_slice(ref_noise, accelerator).to(run.device), run.dtype,
                )  # fmt: skip
                group = data.group_ids[indices].to(run.device)
                stf = {"group": group, "reference_latents": torch.cat([latents, ref_latents]),
                       "reference_group": torch.cat([group, data.group_ids[ref_rows].to(run.device)])}  # fmt: skip
            # f(x_t, t) with gradient; target sg(f(x_r, r)) with the current weights, same noise and dropout mask
            loss, step_logs = loss_fn(student, latents, cond, noise=noise, sigmas=sigmas.to(run.device),
                                      target_denoiser=target, **stf)  # fmt: skip
            run.student.activate()  # gradient checkpointing re-runs the student's forward during backward
            run.update_student(loss.mean(), step, "loss_ct")
        run.ema_step()
        step.logs.update(loss_ct=step_logs["loss_ct"], stage=loss_fn.stage, lr=run.sched_student.get_last_lr()[0])
        logs = step.logs

    # Final save: the one-step pipeline (EMA weights when kept) with mid_timestep in its scheduler, card, Hub
    return run.finish(
        argv, script="training/train_sct.py", logs=logs, method_name=ct.method.upper(),
        paper="[ECT, arXiv 2406.14548](https://arxiv.org/abs/2406.14548)"
        + ("; [SCT, arXiv 2410.18958](https://arxiv.org/abs/2410.18958)" if ct.method == "sct" else ""),
        hyperparameters={"P_mean, P_std": (ct.P_mean, ct.P_std), "q, k, b": (ct.q, ct.k, ct.b),
                         "double_every": double_every, "huber_c": ct.huber_c, "weighting": ct.weighting,
                         "dropout": ct.dropout, "mid_timestep": run.scheduler.config.mid_timestep,
                         **({"stf_reference_size": references} if ct.method == "sct" else {})},
        tags=["consistency-tuning", ct.method],
    )  # fmt: skip


if __name__ == "__main__":
    run_script(main)
