"""Command-line arguments of the training scripts: dataclasses parsed by transformers' `HfArgumentParser`.

`TrainingArguments` holds what every distillation script shares (teacher, student, data, optimisation,
checkpointing, validation, tracking, Hub); each script adds a dataclass of its method's own hyperparameters, declared
with `arg(...)` so that its range / path checks run with the shared ones. `--preset NAME` fills defaults from
`PRESETS`; flags given explicitly on the command line override them.

Every value is checked before any work (no model loaded, no directory created): `parse_args` refuses abbreviated and
unknown flags (one line naming the closest valid flag, values never echoed, so a mistyped token flag does not print
the token), then checks each field's declared range or path, and `validate_training_args` the cross-field rules
(including what can be read from a local teacher's JSON configs: safetensors weights, the resolution's multiple).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.util
import json
import logging
import math
import os
import re
import sys
import types
from dataclasses import dataclass
from typing import Literal

from transformers import HfArgumentParser

from .errors import TrainingArgumentError


__all__ = [
    "LORA_LEARNING_RATE",
    "LR_SCHEDULERS",
    "PRESETS",
    "STUDENT_LEARNING_RATE",
    "TrainingArgumentError",
    "TrainingArguments",
    "arg",
    "check_arguments",
    "parse_args",
    "resolve_max_train_steps",
    "secret_argument_names",
    "validate_training_args",
]

logger = logging.getLogger(__name__)

# diffusers.optimization.SchedulerType's values (not imported: parsing must not wait for diffusers)
LR_SCHEDULERS = [
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "piecewise_constant",
    "cosine_with_min_lr",
]  # fmt: skip
STUDENT_LEARNING_RATE = 1e-6  # a full student: the paper's value (METHODS.md section 2)
LORA_LEARNING_RATE = 1e-4  # a LoRA student: adapters start at zero and have few parameters (diffusers' LoRA scripts)

# Paper settings (METHODS.md section 2). Batch size and step count are *unverified* (SNOOPI/SwiftBrush do not
# state them in a form we could check offline): the values below fit one 80 GB GPU at 512 px. The student learning
# rate is not preset: it follows the student kind (`STUDENT_LEARNING_RATE` / `LORA_LEARNING_RATE`).
_PGSB = {
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
    # SDXL: SNOOPI reports no SDXL run. The teacher id is SDXL's usual base (1024 px, the default resolution follows
    # the teacher); k ~ U(0.5, 4) is the SD range carried over and the batch size is cut to fit 1024 px (*unverified*).
    "sdxl-pgsb": {
        **_PGSB,
        "pretrained_teacher_model_name_or_path": "stabilityai/stable-diffusion-xl-base-1.0",
        "train_batch_size": 4,
    },
    # PixArt-α 512 px: k ~ U(0.5, 3) is SNOOPI's PixArt range (METHODS.md section 2); the rest is the SD recipe
    # (*unverified* for PixArt: batch size, steps, learning rates, LoRA rank / alpha on the DiT's to_q/k/v/out.0).
    "pixart-pgsb": {
        **_PGSB,
        "pretrained_teacher_model_name_or_path": "PixArt-alpha/PixArt-XL-2-512x512",
        "guidance_scale_max": 3.0,
    },
}

# SiD / SiD-LSG (METHODS.md sections 4 and 9, from mingyuanzhou/SiD-LSG): prompts only, generator input s_625 z at
# t_init 625, alpha 1, lr 1e-6 for both players, Adam betas (0, 0.999), fp32 (the official default: its fp16 path clips
# gradient values at 1), LSG with all four guidance scales equal (1.5 gives SiD-LSG's best FID on SD1.5, 4.5 its best
# CLIP score), a full fake-score copy. Batch size and steps: the official 512 via accumulation does not fit one GPU
# step; 16 x 4 accumulation here (*unverified* against the paper's FID).
_SID = {
    "t_init": 625,
    "input_type": "scaled_noise",
    "alpha": 1.0,
    "guidance_scale": 1.5,
    "learning_rate": 1e-6,
    "fake_score_learning_rate": 1e-6,
    "adam_beta1": 0.0,
    "adam_beta2": 0.999,
    "adam_weight_decay": 0.0,
    "fake_score_lora_rank": 0,
    "mixed_precision": "no",
    "train_batch_size": 16,
    "gradient_accumulation_steps": 4,
    "max_train_steps": 20_000,
    "lr_scheduler": "constant",
    "checkpointing_steps": 500,
    "validation_steps": 500,
    "use_ema": True,
    "gradient_checkpointing": True,
}
PRESETS.update({
    "sd15-sid-lsg": {**_SID, "pretrained_teacher_model_name_or_path": "stable-diffusion-v1-5/stable-diffusion-v1-5"},
    "sd21-sid-lsg": {**_SID, "pretrained_teacher_model_name_or_path": "stabilityai/stable-diffusion-2-1-base"},
    # SDXL / PixArt: the official code covers SD1.5 / SD2.1 only; the SD recipe carried over (*unverified*), batch cut
    "sdxl-sid": {**_SID, "pretrained_teacher_model_name_or_path": "stabilityai/stable-diffusion-xl-base-1.0",
                 "train_batch_size": 4, "gradient_accumulation_steps": 16},
    "pixart-sid": {**_SID, "pretrained_teacher_model_name_or_path": "PixArt-alpha/PixArt-XL-2-512x512"},
})  # fmt: skip

# ECT / SCT (METHODS.md section 5, from locuslab/ect `run_ecm.sh`, the CIFAR-10 recipe its paper numbers come from):
# RAdam lr 1e-4, betas (0.9, 0.999), no weight decay, dropout 0.2, EMA 0.9999, batch 128, the gap halving 8 times over
# the run (`--double 250` ticks of 12.8 kimg in 25.6 Mimg). For latent text-to-image teachers nothing is published
# (*unverified*): batch 128 through 16 x 8 accumulation, 20k steps, bf16, the recipe's dropout on SD's residual blocks.
# Gradients are clipped at norm 1 (the shared `--max_grad_norm`; neither ECT nor ACT clips: a deviation kept for
# stability at bf16, unmeasured; both presets inherit it).
# what ECT's and ACT's presets share: RAdam without weight decay, a student sampling from pure noise at t 999, bf16,
# 16 x 8 accumulation, 20k steps (SDXL: 4 x 32, `_SDXL_BATCH`)
_REAL_DATA = {
    "optimizer": "radam",
    "adam_weight_decay": 0.0,
    "t_init": 999,
    "input_type": "noise",
    "mixed_precision": "bf16",
    "train_batch_size": 16,
    "gradient_accumulation_steps": 8,
    "max_train_steps": 20_000,
    "lr_scheduler": "constant",
    "checkpointing_steps": 1000,
    "validation_steps": 1000,
}
_SDXL_BATCH = {"train_batch_size": 4, "gradient_accumulation_steps": 32}
_CT = {
    **_REAL_DATA,
    "learning_rate": 1e-4,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "dropout": 0.2,
    "use_ema": True,
    "ema_decay": 0.9999,
}
_TEACHERS = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd21": "stabilityai/stable-diffusion-2-1-base",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "pixart": "PixArt-alpha/PixArt-XL-2-512x512",
}
PRESETS.update({
    f"{name}-{method}": {**_CT, "method": method, "pretrained_teacher_model_name_or_path": teacher,
                         **(_SDXL_BATCH if name == "sdxl" else {})}
    for name, teacher in _TEACHERS.items() for method in ("ect", "sct")
})  # fmt: skip

# ACT (METHODS.md section 6, kong13661/ACT `train_imagenet64.py` main(): its conditional, largest-scale setting):
# RAdam lr 5e-5 for both players, betas (0, 0.99) (D: beta2 x 16/17), lambda 0.6 with the per-level schedule (0.2 at
# mid grid), N(k) 2 -> 200, mu0 0.95, R1 gamma 10 every 16 steps, 16-bit. Batch (16 x 8 accumulation: 64 images for
# the student, 64 for D per step) and 20k steps are *unverified* for latent text-to-image teachers (official: 320
# per GPU for the student, 400k steps).
_ACT = {
    **_REAL_DATA,
    "learning_rate": 5e-5,
    "adam_beta1": 0.0,
    "adam_beta2": 0.99,
    "adversarial_weight": 0.6,
    "mid_weight": 0.2,
    "bins_max": 200,
    "ema_decay_init": 0.95,
}
PRESETS.update({
    f"{name}-act": {**_ACT, "pretrained_teacher_model_name_or_path": teacher, **(_SDXL_BATCH if name == "sdxl" else {})}
    for name, teacher in _TEACHERS.items()
})  # fmt: skip

_CHECK = "onestep_check"  # field-metadata key of `arg`'s checks (removed before argparse sees the metadata)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_SECRET_NAME = re.compile(r"token|secret|password|api_key", re.IGNORECASE)
PROMPT_FILE_EXTENSIONS = (".txt", ".csv", ".json", ".jsonl", ".parquet")


@dataclass(frozen=True)
class _Check:
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    path: str | None = None  # "model", "prompts", "dataset", "dir", "output_dir"


def arg(
    default,
    help: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    path: Literal["model", "prompts", "dataset", "dir", "output_dir"] | None = None,
    **kwargs,
):
    r"""
    A dataclass field for a command-line flag, with the checks `check_arguments` runs on its value.

    Args:
        default: the default value.
        help (`str`): the `--help` text.
        low, high (`float`, *optional*): the allowed range (inclusive unless `low_open` / `high_open`). A float field
            with a range must also be finite.
        path (`str`, *optional*): `"model"` (a local directory or a Hub id), `"prompts"` (a prompt file, a dataset
            directory or a Hub dataset id), `"dataset"` (a dataset directory or Hub id), `"dir"` (an existing
            directory), `"output_dir"` (a directory that exists or can be created, not a file).
        kwargs: further `argparse` settings (`choices`, `aliases`, `nargs`).
    """
    metadata = {"help": help, **kwargs}
    if low is not None or high is not None or path is not None:
        metadata[_CHECK] = _Check(low, high, low_open, high_open, path)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass
class TrainingArguments:
    r"""Arguments shared by every distillation script (diffusers' example-script names where one exists)."""

    preset: str | None = arg(None, f"Named defaults, overridden by explicit flags: {sorted(PRESETS)}.")
    # teacher and student
    pretrained_teacher_model_name_or_path: str | None = arg(
        None,
        "Teacher: a diffusers text-to-image directory or Hub id (safetensors weights).",
        path="model",
        aliases=["--pretrained_model_name_or_path"],
    )
    revision: str | None = arg(None, "Revision (branch, tag or commit) of the teacher on the Hub.")
    variant: str | None = arg(None, "Weight variant of the teacher, e.g. 'fp16'.")
    student_lora_rank: int = arg(0, "0: train a full copy of the UNet; >0: train a LoRA adapter of this rank.", low=0)
    student_lora_alpha: int | None = arg(None, "LoRA alpha of the student (defaults to its rank).", low=1)
    student_lora_target_modules: str | None = arg(
        None,
        "Comma-separated module names the student LoRA adapts (default: the backbone's, e.g. for a UNet "
        "'to_q,to_k,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2,conv1,conv2,conv_shortcut,time_emb_proj').",
    )
    t_init: int = arg(999, "The student's conditioning timestep (999 SwiftBrush, 625 SiD-LSG).", low=0, high=999)
    input_type: Literal["noise", "scaled_noise"] = arg("noise", "Student input: z ('noise') or s_t_init z.")
    resolution: int | None = arg(
        None,
        "Image size (> 0, a multiple of the VAE factor times the network's downsampling: a UNet's levels, a DiT's patch "
        "size); defaults to the teacher network's sample size times the VAE factor.",
        low=1,
    )
    # data: exactly one prompt source
    train_prompts: str | None = arg(
        None, f"Prompts: a {'/'.join(PROMPT_FILE_EXTENSIONS)} file, a dataset directory or a Hub dataset id.",
        path="prompts",
    )  # fmt: skip
    dataset_name: str | None = arg(
        None, "Prompt source: a Hub dataset id or a local `datasets` directory (its caption column).", path="dataset"
    )
    train_data_dir: str | None = arg(
        None, "Prompt source: an imagefolder directory whose metadata.jsonl/.csv holds the captions.", path="dir"
    )
    prompt_column: str | None = arg(
        None, "Column holding the prompts (default: prompt, text or caption).", aliases=["--caption_column"]
    )
    image_column: str = arg("image", "Real-data scripts (consistency tuning): the dataset's image column.")
    random_flip: bool = arg(False, "Real-data scripts: flip each training image horizontally with probability 0.5.")
    # optimisation
    output_dir: str = arg("onestep-student", "Where checkpoints, logs and the final model go.", path="output_dir")
    seed: int | None = arg(None, "Seed of every random draw (data order, noise, timesteps, guidance scales).", low=0,
                           high=2**32 - 1)  # fmt: skip
    train_batch_size: int = arg(4, "Prompts per device per micro-step.", low=1)
    max_train_steps: int | None = arg(
        None, "Optimizer steps (default 1000, or what --num_train_epochs gives; wins over --num_train_epochs).", low=1
    )
    num_train_epochs: int | None = arg(
        None, "Passes over the prompts (global batch x accumulation per step); used when --max_train_steps is unset.",
        low=1,
    )  # fmt: skip
    max_train_minutes: float | None = arg(
        None, "Stop once this many minutes of training (--train_clock) are spent, with a last checkpoint and the usual "
        "final save, even before --max_train_steps (which still sets the schedules). Counts from this launch's loop.",
        low=0, low_open=True,
    )  # fmt: skip
    train_clock: Literal["wall", "cpu"] = arg(
        "wall", "The clock of --max_train_minutes and of the minutes in each checkpoint.json: wall time, or this "
        "process's CPU time summed over its threads (core-minutes: a fair budget on a shared CPU; no GPU time).",
    )  # fmt: skip
    gradient_accumulation_steps: int = arg(1, "Micro-steps per optimizer step.", low=1)
    gradient_checkpointing: bool = arg(False, "Trade compute for memory in the UNets.")
    learning_rate: float | None = arg(
        None,
        f"Student learning rate. Default: {STUDENT_LEARNING_RATE:g} for a full student (the paper's), "
        f"{LORA_LEARNING_RATE:g} with --student_lora_rank > 0 (a LoRA adapter starts at zero and has few parameters, "
        "so it needs a ~100x larger step, as in diffusers' LoRA scripts).",
        low=0,
        low_open=True,
    )
    lr_scheduler: str = arg("constant", "Learning-rate schedule.", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = arg(0, "Warm-up steps of the schedule.", low=0)
    adam_beta1: float = arg(0.9, "AdamW beta1.", low=0, high=1, high_open=True)
    adam_beta2: float = arg(0.999, "AdamW beta2.", low=0, high=1, high_open=True)
    adam_weight_decay: float = arg(1e-2, "AdamW weight decay.", low=0)
    adam_epsilon: float = arg(1e-8, "AdamW epsilon.", low=0, low_open=True)
    max_grad_norm: float = arg(1.0, "Gradient clipping norm.", low=0, low_open=True)
    optimizer: Literal["adamw", "radam"] = arg("adamw", "AdamW, or RAdam (ECT's; decoupled weight decay).")
    use_8bit_adam: bool = arg(False, "bitsandbytes' 8-bit AdamW (needs bitsandbytes).")
    mixed_precision: Literal["no", "fp16", "bf16"] | None = arg(None, "Defaults to the accelerate config.")
    allow_tf32: bool = arg(False, "Allow TF32 matmuls on Ampere+ GPUs.")
    use_ema: bool = arg(False, "Keep an EMA of the student (saved as the final weights).")
    ema_decay: float = arg(0.9999, "EMA decay.", low=0, high=1, low_open=True, high_open=True)
    nan_policy: Literal["raise", "skip"] = arg("raise", "On a non-finite loss or gradient: stop, or skip the step.")
    max_nan_skips: int = arg(
        5, "With --nan_policy skip: stop once more than this many optimizer steps of the last --nan_skip_window "
        "were skipped (a diverged run, not a rare overflow).", low=0,
    )  # fmt: skip
    nan_skip_window: int = arg(100, "The window (optimizer steps) --max_nan_skips counts over.", low=1)
    # checkpointing
    checkpointing_steps: int = arg(500, "Save a resumable checkpoint every N optimizer steps.", low=1)
    checkpoints_total_limit: int | None = arg(None, "Keep at most this many checkpoints.", low=1)
    resume_from_checkpoint: str | None = arg(None, "'latest' or a checkpoint directory.")
    # validation and tracking
    validation_prompts: list[str] | None = arg(None, "Prompts rendered at every validation.")
    validation_steps: int = arg(500, "Validate every N optimizer steps (and at the end).", low=1)
    num_validation_images: int = arg(2, "Images per validation prompt.", low=1)
    report_to: Literal["tensorboard", "wandb", "all", "none"] = arg(
        "tensorboard", "Tracker ('all': every tracker installed)."
    )
    logging_dir: str = arg("logs", "Tracker directory, relative to output_dir.")
    tracker_project_name: str = arg("diffusers-onestep", "Tracker project name.")
    # Hub
    push_to_hub: bool = arg(False, "Upload the final model to the Hub.")
    hub_model_id: str | None = arg(None, "Hub repository id (defaults to the output_dir name).")
    hub_token: str | None = arg(
        None, "Hub token. Prefer `hf auth login` or the HF_TOKEN variable: a token on the command line is visible to "
        "other users and printed by `accelerate launch` when a run fails. Never written or logged here.",
    )  # fmt: skip
    hub_private: bool = arg(False, "Create the Hub repository as private.")
    hub_base_model: str | None = arg(None, "Hub id for the card's base_model when the teacher is a local copy.")
    hub_timeout: float = arg(60.0, "Seconds a Hub request may wait for the server before it is retried.", low=0,
                             low_open=True)  # fmt: skip
    hub_retries: int = arg(2, "Retries of a Hub call that timed out or hit a server error.", low=0)


class _Parser(HfArgumentParser):
    """HfArgumentParser with `arg`'s checks kept out of argparse and one-line errors."""

    @staticmethod
    def _parse_dataclass_field(parser, field):
        if _CHECK in field.metadata:
            field = _copy_field(field, {k: v for k, v in field.metadata.items() if k != _CHECK})
        HfArgumentParser._parse_dataclass_field(parser, field)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _copy_field(field, metadata: dict):
    copied = copy.copy(field)
    copied.metadata = types.MappingProxyType(metadata)
    return copied


def _option_value(argv: list[str], option: str) -> str | None:
    for i, token in enumerate(argv):
        if token == option and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith(option + "="):
            return token.split("=", 1)[1]
    return None


def parse_args(
    dataclass_types: tuple[type, ...], argv: list[str] | None = None, presets: dict | None = None
) -> tuple:
    r"""
    Parses `argv` into one instance per dataclass, then runs `check_arguments` on each. With `--preset NAME`,
    `presets[NAME]` supplies defaults that explicit flags override.

    Abbreviated flags are refused (`--hub_tok` is not `--hub_token`); an unknown flag exits with one line naming the
    closest valid flag (values are never echoed). Bad values exit with argparse's one-line message or raise
    `TrainingArgumentError`, both naming the flag and the allowed values.

    Args:
        dataclass_types (`tuple[type, ...]`): the dataclasses (e.g. `(TrainingArguments, PGSwiftBrushArguments)`).
        argv (`list[str]`, *optional*): defaults to `sys.argv[1:]`.
        presets (`dict`, *optional*): defaults to `PRESETS`.

    Returns:
        `tuple` of dataclass instances, in the order of `dataclass_types`.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    presets = PRESETS if presets is None else presets
    parser = _Parser(dataclass_types, allow_abbrev=False)
    preset = _option_value(argv, "--preset")
    if preset is not None:
        if preset not in presets:
            parser.error(f"argument --preset: invalid choice: {preset!r} (choose from {sorted(presets)})")
        destinations = {action.dest for action in parser._actions}
        unknown = sorted(set(presets[preset]) - destinations)
        if unknown:
            raise ValueError(f"Preset {preset!r} sets {unknown}, which this script does not define.")
        parser.set_defaults(**presets[preset])
    namespace, remaining = parser.parse_known_args(argv)
    if remaining:
        flags = [token.split("=", 1)[0] for token in remaining if token.startswith("-")]
        if not flags:
            parser.error(f"{len(remaining)} unexpected positional value(s): every setting is a --flag")
        options = [option for option in parser._option_string_actions if option.startswith("--")]
        close = difflib.get_close_matches(flags[0], options, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else ""
        parser.error(f"unrecognized argument {flags[0]}{hint}")
    explicit = {
        parser._option_string_actions[token.split("=", 1)[0]].dest
        for token in argv
        if token.split("=", 1)[0] in parser._option_string_actions
    }
    outputs = []
    for dtype in dataclass_types:
        keys = {f.name for f in dataclasses.fields(dtype) if f.init}
        outputs.append(dtype(**{k: v for k, v in vars(namespace).items() if k in keys}))
    for output in outputs:
        # an explicit epoch count beats a preset's step count (explicit flags override presets)
        if "num_train_epochs" in explicit and "max_train_steps" not in explicit and hasattr(output, "max_train_steps"):
            output.max_train_steps = None
        check_arguments(output)
    return tuple(outputs)


def check_arguments(args) -> None:
    r"""
    Runs the checks declared with `arg(...)` on every field of the dataclass instance `args`: ranges (and finiteness
    of floats with a range) and paths. Raises `TrainingArgumentError` naming the flag and what is allowed.
    """
    for field in dataclasses.fields(args):
        check, value = field.metadata.get(_CHECK), getattr(args, field.name)
        if check is None or value is None:
            continue
        flag = f"--{field.name}"
        if check.low is not None or check.high is not None:
            _check_range(flag, value, check)
        if check.path is not None:
            _check_path(flag, str(value), check.path)


def _check_range(flag: str, value, check: _Check) -> None:
    if check.high is None:
        allowed = f"{'>' if check.low_open else '>='} {check.low:g}"
    else:
        low, high = f"{check.low:g}", str(check.high) if isinstance(check.high, int) else f"{check.high:g}"
        allowed = f"in {'(' if check.low_open else '['}{low}, {high}{')' if check.high_open else ']'}"
    if isinstance(value, float) and not math.isfinite(value):
        raise TrainingArgumentError(f"`{flag}` must be a finite number {allowed}, got {value}.")
    too_low = check.low is not None and (value <= check.low if check.low_open else value < check.low)
    too_high = check.high is not None and (value >= check.high if check.high_open else value > check.high)
    if too_low or too_high:
        raise TrainingArgumentError(f"`{flag}` must be {allowed}, got {value}.")


def _looks_like_path(value: str) -> bool:
    return (
        value.startswith(("/", "./", "../", "~", "\\")) or value.count("/") > 1 or value.endswith("/") or "\\" in value
    )


def _check_path(flag: str, value: str, kind: str) -> None:
    value = os.path.expanduser(value)
    if kind == "output_dir":
        if os.path.exists(value) and not os.path.isdir(value):
            raise TrainingArgumentError(f"`{flag}` {value!r} is a file; pass a directory (existing or new).")
        parent = os.path.abspath(value)
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
            raise TrainingArgumentError(f"`{flag}` {value!r}: {parent!r} is not a writable directory.")
        return
    if kind == "dir":
        if not os.path.isdir(value):
            raise TrainingArgumentError(f"`{flag}` {value!r} is not a directory.")
        return
    if os.path.exists(value):
        if kind == "prompts" and os.path.isfile(value):
            if os.path.splitext(value)[1].lower() not in PROMPT_FILE_EXTENSIONS:
                raise TrainingArgumentError(
                    f"`{flag}` {value!r}: use a {', '.join(PROMPT_FILE_EXTENSIONS)} file or a dataset directory."
                )
        elif not os.path.isdir(value):
            raise TrainingArgumentError(f"`{flag}` {value!r} is a file; pass a directory or a Hub id.")
        return
    what = {"model": "model", "prompts": "dataset", "dataset": "dataset"}[kind]
    is_file_name = kind == "prompts" and os.path.splitext(value)[1].lower() in PROMPT_FILE_EXTENSIONS
    if is_file_name or _looks_like_path(value) or not _REPO_ID.match(value) or ".." in value or "--" in value:
        raise TrainingArgumentError(
            f"`{flag}` {value!r}: no such {'file' if is_file_name else 'directory'}, and not a Hub {what} id "
            "(`name` or `namespace/name`)."
        )


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _check_local_teacher(args: TrainingArguments) -> None:
    """What a local teacher's JSON configs let us check without loading weights."""
    path, flag = args.pretrained_teacher_model_name_or_path, "--pretrained_teacher_model_name_or_path"
    if not os.path.isdir(path):
        return
    from ..pipelines.loading import check_safetensors_only

    check_safetensors_only(path, flag)
    index = _read_json(os.path.join(path, "model_index.json"))
    if index is None:
        raise TrainingArgumentError(
            f"`{flag}` {path!r} is not a diffusers pipeline directory (no model_index.json): pass the directory "
            "written by `save_pretrained` or a Hub id."
        )
    from .backbones import check_teacher_class

    backbone = check_teacher_class(index.get("_class_name"), flag)  # SD, SDXL, PixArt; anything else named and refused
    vae = _read_json(os.path.join(path, "vae", "config.json"))
    network = _read_json(os.path.join(path, backbone.network_attribute, "config.json"))
    if args.resolution is not None and vae is not None and network is not None:
        vae_factor = 2 ** (len(vae.get("block_out_channels", [0])) - 1)
        try:
            multiple = vae_factor * backbone.downsampling(network)
        except (KeyError, TypeError):
            return  # an unusual config: `teacher_latent_shape` checks the loaded network
        if args.resolution % multiple:
            raise TrainingArgumentError(
                f"`--resolution` must be a multiple of {multiple} for this teacher (VAE factor {vae_factor} x the "
                f"network's downsampling {multiple // vae_factor}), got {args.resolution}."
            )


def validate_training_args(args: TrainingArguments) -> None:
    r"""
    Checks cross-field constraints before any work and fills the defaults that depend on other flags (the student
    learning rate: `STUDENT_LEARNING_RATE` for a full student, `LORA_LEARNING_RATE` for a LoRA student). Raises
    `TrainingArgumentError` naming the argument and the allowed values. Warns when `--hub_token` is given.
    """
    check_arguments(args)
    if args.hub_token is not None:
        logger.warning(
            "`--hub_token` was given on the command line, where other users can read it (`ps`, shell history) and "
            "where `accelerate launch` prints it if the run fails (it shows the failed command; `accelerate launch "
            "--quiet` does not). Prefer `hf auth login` or the HF_TOKEN environment variable, which are used when "
            "`--hub_token` is omitted."
        )
    if not args.pretrained_teacher_model_name_or_path:
        raise TrainingArgumentError(
            "`--pretrained_teacher_model_name_or_path` (or `--pretrained_model_name_or_path`) is required: a diffusers "
            "directory or Hub id."
        )
    sources = [name for name in ("train_prompts", "dataset_name", "train_data_dir") if getattr(args, name)]
    if len(sources) != 1:
        given = f" (got {', '.join('--' + s for s in sources)})" if sources else ""
        raise TrainingArgumentError(
            "Pass exactly one prompt source: `--train_prompts` (a .txt/.csv/.json/.jsonl/.parquet file), "
            f"`--dataset_name` (a Hub dataset id or `datasets` directory) or `--train_data_dir` (an imagefolder){given}."
        )
    if args.learning_rate is None:
        args.learning_rate = LORA_LEARNING_RATE if args.student_lora_rank > 0 else STUDENT_LEARNING_RATE
    if args.max_train_steps is None and args.num_train_epochs is None:
        args.max_train_steps = 1000
    if args.use_8bit_adam and args.optimizer != "adamw":
        raise TrainingArgumentError(
            f"`--use_8bit_adam` is an AdamW option, got `--optimizer {args.optimizer}`: drop one of them."
        )
    if args.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise TrainingArgumentError("`--use_8bit_adam` needs bitsandbytes: `pip install bitsandbytes`, or drop the flag.")
    if args.report_to not in ("none", "all") and importlib.util.find_spec(args.report_to) is None:
        raise TrainingArgumentError(
            f"`--report_to {args.report_to}` needs `pip install {args.report_to}` (or use 'all' or 'none')."
        )
    wandb = args.report_to == "wandb" or (args.report_to == "all" and importlib.util.find_spec("wandb") is not None)
    if wandb and args.hub_token is not None:
        raise TrainingArgumentError(
            "`--hub_token` with W&B tracking would log the token (W&B records the command line): use `hf auth login` "
            "or the HF_TOKEN variable instead."
        )
    if args.push_to_hub and args.hub_model_id is not None and not _REPO_ID.match(args.hub_model_id):
        raise TrainingArgumentError(f"`--hub_model_id` {args.hub_model_id!r} is not a Hub id (`namespace/name`).")
    if args.resume_from_checkpoint not in (None, "latest") and not os.path.isdir(args.resume_from_checkpoint):
        raise TrainingArgumentError(
            f"`--resume_from_checkpoint` must be 'latest' or a checkpoint-N directory, got {args.resume_from_checkpoint!r}."
        )
    _check_local_teacher(args)


def resolve_max_train_steps(args: TrainingArguments, num_prompts: int, num_processes: int = 1) -> int:
    r"""
    Sets `args.max_train_steps` from `--num_train_epochs` when it is unset: one epoch is `ceil(num_prompts /
    (train_batch_size x num_processes x gradient_accumulation_steps))` optimizer steps. Returns the step count.
    """
    if args.max_train_steps is None:
        per_step = args.train_batch_size * num_processes * args.gradient_accumulation_steps
        args.max_train_steps = args.num_train_epochs * math.ceil(num_prompts / per_step)
    return args.max_train_steps


def secret_argument_names(dataclass_types: tuple[type, ...]) -> list[str]:
    r"""The fields whose values are secrets (their names contain token, secret, password or api_key)."""
    return [f.name for dtype in dataclass_types for f in dataclasses.fields(dtype) if _SECRET_NAME.search(f.name)]
