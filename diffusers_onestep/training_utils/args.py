"""Command-line arguments of the training scripts: dataclasses parsed by transformers' `HfArgumentParser`.

`TrainingArguments` holds what every distillation script shares (teacher, student, data, optimisation,
checkpointing, validation, tracking, Hub); each script adds a dataclass of its method's own hyperparameters.
`--preset NAME` fills defaults from `PRESETS`; flags given explicitly on the command line override them.
"""

from __future__ import annotations

import argparse
import importlib.util
from dataclasses import dataclass, field
from typing import Literal

from diffusers.optimization import SchedulerType
from transformers import HfArgumentParser


__all__ = ["PRESETS", "TrainingArguments", "parse_args", "validate_training_args"]

LR_SCHEDULERS = [s.value for s in SchedulerType]

# Paper settings (METHODS.md section 2). Batch size and step count are *unverified* (SNOOPI/SwiftBrush do not
# state them in a form we could check offline): the values below fit one 80 GB GPU at 512 px.
_PGSB = {
    "learning_rate": 1e-6,
    "fake_score_learning_rate": 1e-3,
    "fake_score_lora_rank": 64,
    "fake_score_lora_alpha": 128,
    "guidance_scale_min": 0.5,
    "guidance_scale_max": 4.0,
    "t_init": 999,
    "input_type": "noise",
    "mixed_precision": "bf16",
    "max_grad_norm": 1.0,
    "train_batch_size": 16,
    "max_train_steps": 40_000,
    "lr_scheduler": "constant",
    "checkpointing_steps": 1000,
    "validation_steps": 1000,
}
PRESETS: dict[str, dict] = {
    "sd15-pgsb": {**_PGSB, "pretrained_teacher_model_name_or_path": "stable-diffusion-v1-5/stable-diffusion-v1-5"},
    "sd21-pgsb": {**_PGSB, "pretrained_teacher_model_name_or_path": "stabilityai/stable-diffusion-2-1-base"},
    # the SwiftBrush baseline: one fixed guidance scale on teacher and fake score (SwiftBrush used 4.5)
    "sd15-swiftbrush": {
        **_PGSB,
        "pretrained_teacher_model_name_or_path": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "fixed_guidance_scale": 4.5,
    },
    "sd21-swiftbrush": {
        **_PGSB,
        "pretrained_teacher_model_name_or_path": "stabilityai/stable-diffusion-2-1-base",
        "fixed_guidance_scale": 4.5,
    },
}


def _f(default, help: str, **kwargs):
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class TrainingArguments:
    r"""Arguments shared by every distillation script (diffusers' example-script names where one exists)."""

    preset: str | None = _f(None, f"Named defaults, overridden by explicit flags: {sorted(PRESETS)}.")
    # teacher and student
    pretrained_teacher_model_name_or_path: str | None = _f(None, "Teacher: diffusers text-to-image dir or Hub id.")
    revision: str | None = _f(None, "Revision (branch, tag or commit) of the teacher on the Hub.")
    variant: str | None = _f(None, "Weight variant of the teacher, e.g. 'fp16'.")
    student_lora_rank: int = _f(0, "0: train a full copy of the UNet; >0: train a LoRA adapter of this rank.")
    student_lora_alpha: int | None = _f(None, "LoRA alpha of the student (defaults to its rank).")
    student_lora_target_modules: str = _f(
        "to_q,to_k,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2,conv1,conv2,conv_shortcut,time_emb_proj",
        "Comma-separated module names the student LoRA adapts.",
    )
    t_init: int = _f(999, "The student's conditioning timestep (999 SwiftBrush, 625 SiD-LSG).")
    input_type: Literal["noise", "scaled_noise"] = _f("noise", "Student input: z ('noise') or s_t_init z.")
    resolution: int | None = _f(None, "Image size; defaults to the teacher UNet's sample size times the VAE factor.")
    # data
    train_prompts: str | None = _f(None, "Prompts: .txt (one per line), .csv/.json/.jsonl/.parquet, dataset dir.")
    prompt_column: str | None = _f(None, "Column holding the prompts (default: prompt, text or caption).")
    # optimisation
    output_dir: str = _f("onestep-student", "Where checkpoints, logs and the final model go.")
    seed: int | None = _f(None, "Seed of every random draw (data order, noise, timesteps, guidance scales).")
    train_batch_size: int = _f(4, "Prompts per device per micro-step.")
    max_train_steps: int = _f(1000, "Optimizer steps.")
    gradient_accumulation_steps: int = _f(1, "Micro-steps per optimizer step.")
    gradient_checkpointing: bool = _f(False, "Trade compute for memory in the UNets.")
    learning_rate: float = _f(1e-6, "Student learning rate.")
    lr_scheduler: str = _f("constant", "Learning-rate schedule.", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = _f(0, "Warm-up steps of the schedule.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_weight_decay: float = _f(1e-2, "AdamW weight decay.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm.")
    use_8bit_adam: bool = _f(False, "bitsandbytes' 8-bit AdamW (needs bitsandbytes).")
    mixed_precision: Literal["no", "fp16", "bf16"] | None = _f(None, "Defaults to the accelerate config.")
    allow_tf32: bool = _f(False, "Allow TF32 matmuls on Ampere+ GPUs.")
    use_ema: bool = _f(False, "Keep an EMA of the student (saved as the final weights).")
    ema_decay: float = _f(0.9999, "EMA decay.")
    nan_policy: Literal["raise", "skip"] = _f("raise", "On a non-finite loss or gradient: stop, or skip the step.")
    # checkpointing
    checkpointing_steps: int = _f(500, "Save a resumable checkpoint every N optimizer steps.")
    checkpoints_total_limit: int | None = _f(None, "Keep at most this many checkpoints.")
    resume_from_checkpoint: str | None = _f(None, "'latest' or a checkpoint directory.")
    # validation and tracking
    validation_prompts: list[str] | None = _f(None, "Prompts rendered at every validation.")
    validation_steps: int = _f(500, "Validate every N optimizer steps (and at the end).")
    num_validation_images: int = _f(2, "Images per validation prompt.")
    report_to: Literal["tensorboard", "wandb", "none"] = _f("tensorboard", "Tracker.")
    logging_dir: str = _f("logs", "Tracker directory, relative to output_dir.")
    tracker_project_name: str = _f("diffusers-onestep", "Tracker project name.")
    # Hub
    push_to_hub: bool = _f(False, "Upload the final model to the Hub.")
    hub_model_id: str | None = _f(None, "Hub repository id (defaults to the output_dir name).")
    hub_token: str | None = _f(None, "Hub token (defaults to the stored login); never printed.")
    hub_private: bool = _f(False, "Create the Hub repository as private.")
    hub_base_model: str | None = _f(None, "Hub id for the card's base_model when the teacher is a local copy.")


def parse_args(dataclass_types: tuple[type, ...], argv: list[str] | None = None, presets: dict | None = None):
    r"""
    Parses `argv` into one instance per dataclass. With `--preset NAME`, `presets[NAME]` supplies defaults that
    explicit flags override. Bad values exit with argparse's message, which names the flag and the allowed values.

    Args:
        dataclass_types (`tuple[type, ...]`): the dataclasses (e.g. `(TrainingArguments, PGSwiftBrushArguments)`).
        argv (`list[str]`, *optional*): defaults to `sys.argv[1:]`.
        presets (`dict`, *optional*): defaults to `PRESETS`.

    Returns:
        `tuple` of dataclass instances, in the order of `dataclass_types`.
    """
    presets = PRESETS if presets is None else presets
    parser = HfArgumentParser(dataclass_types)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.preset is not None:
        if known.preset not in presets:
            parser.error(f"argument --preset: invalid choice: {known.preset!r} (choose from {sorted(presets)})")
        destinations = {action.dest for action in parser._actions}
        unknown = sorted(set(presets[known.preset]) - destinations)
        if unknown:
            raise ValueError(f"Preset {known.preset!r} sets {unknown}, which this script does not define.")
        parser.set_defaults(**presets[known.preset])
    return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)


def validate_training_args(args: TrainingArguments) -> None:
    r"""Checks cross-field constraints before any work; raises `ValueError` naming the argument and allowed values."""
    if not args.pretrained_teacher_model_name_or_path:
        raise ValueError("`--pretrained_teacher_model_name_or_path` is required (a diffusers directory or Hub id).")
    if not args.train_prompts:
        raise ValueError("`--train_prompts` is required: a .txt/.csv/.json/.jsonl/.parquet file or a dataset.")
    positive = ("train_batch_size", "max_train_steps", "gradient_accumulation_steps", "checkpointing_steps")
    for name in (*positive, "validation_steps", "num_validation_images"):
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name}` must be >= 1, got {getattr(args, name)}.")
    if args.student_lora_rank < 0:
        raise ValueError(f"`--student_lora_rank` must be 0 (full student) or > 0, got {args.student_lora_rank}.")
    if args.student_lora_alpha is not None and args.student_lora_alpha <= 0:
        raise ValueError(f"`--student_lora_alpha` must be > 0, got {args.student_lora_alpha}.")
    if not 0 <= args.t_init < 1000:
        raise ValueError(f"`--t_init` must be in [0, num_train_timesteps), got {args.t_init}.")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise ValueError(f"`--checkpoints_total_limit` must be >= 1 or unset, got {args.checkpoints_total_limit}.")
    if args.learning_rate <= 0 or args.max_grad_norm <= 0:
        raise ValueError("`--learning_rate` and `--max_grad_norm` must be > 0.")
    if not 0 < args.ema_decay < 1:
        raise ValueError(f"`--ema_decay` must be in (0, 1), got {args.ema_decay}.")
    if args.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("`--use_8bit_adam` needs bitsandbytes: `pip install bitsandbytes`, or drop the flag.")
    if args.report_to != "none" and importlib.util.find_spec(args.report_to) is None:
        raise ValueError(f"`--report_to {args.report_to}` needs `pip install {args.report_to}` (or use 'none').")
    if args.report_to == "wandb" and args.hub_token is not None:
        raise ValueError("`--hub_token` with `--report_to wandb` would log the token: use `hf auth login` instead.")
