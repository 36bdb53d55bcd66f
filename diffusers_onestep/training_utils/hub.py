"""The end of a run: the student saved in diffusers formats, its model card, and the optional Hub upload.

A full student becomes a `OneStepPipeline` directory; a LoRA student becomes diffusers-format LoRA weights (with the
adapter metadata, so `lora_alpha != r` survives `load_lora_weights`) plus `scheduler/` holding its `t_init`. The model
card is filled from `model_cards/` with Hub metadata (`library_name`, `pipeline_tag`, `base_model`, `tags`); the Hub
token is never written or logged.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import huggingface_hub
import torch
from accelerate.logging import get_logger
from diffusers import AutoencoderKL
from huggingface_hub import ModelCard, ModelCardData
from peft.utils import get_peft_model_state_dict
from transformers import CLIPTextModel

from ..pipelines import OneStepPipeline


__all__ = ["MODEL_CARD_DIR", "format_command", "push_to_hub", "save_model_card", "save_student"]

logger = get_logger(__name__)
MODEL_CARD_DIR = Path(__file__).resolve().parents[2] / "model_cards"
_SECRET_FLAGS = ("--hub_token", "--hub-token")


def format_command(argv: list[str], script: str) -> str:
    r"""The launch command of a run, as a shell line, with the value of `--hub_token` replaced by `***`."""
    shown, hide_next = [], False
    for arg in argv:
        if hide_next:
            shown.append("***")
            hide_next = False
        elif arg in _SECRET_FLAGS:
            shown.append(arg)
            hide_next = True
        elif arg.split("=", 1)[0] in _SECRET_FLAGS:
            shown.append(arg.split("=", 1)[0] + "=***")
        else:
            shown.append(shlex.quote(arg))
    return " ".join(["accelerate launch", script, *shown])


def save_student(
    output_dir: str,
    unet,
    scheduler,
    teacher,
    adapter_name: str | None = None,
    teacher_name_or_path: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
) -> None:
    r"""
    Saves the trained student in diffusers formats (main process only).

    Args:
        output_dir (`str`): the destination.
        unet (`UNet2DConditionModel`): the unwrapped student (full), or the UNet carrying the student adapter.
        scheduler (`ConsistencyStudentScheduler`): the student's scheduler (holds `t_init` and `input_type`).
        teacher (`TeacherComponents`): VAE, text encoder and tokenizer for a full pipeline.
        adapter_name (`str`, *optional*): the student's LoRA adapter; `None` for a full student.
        teacher_name_or_path, revision, variant: where to reload the VAE and text encoder in their stored precision
            when they were cast for training.
    """
    os.makedirs(output_dir, exist_ok=True)
    if adapter_name is not None:
        # PEFT-format keys, as `load_lora_weights` reads them (diffusers' `convert_state_dict_to_diffusers` would
        # rename attention layers to the legacy `lora.down/up` format and leave conv layers as they are)
        state = get_peft_model_state_dict(unet, adapter_name=adapter_name)
        OneStepPipeline.save_lora_weights(
            output_dir,
            unet_lora_layers={k: v.detach().float().contiguous() for k, v in state.items()},
            unet_lora_adapter_metadata=unet.peft_config[adapter_name].to_dict(),
            safe_serialization=True,
        )
        scheduler.save_pretrained(os.path.join(output_dir, "scheduler"))
        return
    vae, text_encoder = teacher.vae, teacher.text_encoder
    if teacher_name_or_path is not None and vae.dtype != torch.float32:
        kwargs = {"revision": revision, "variant": variant, "use_safetensors": True}
        vae = AutoencoderKL.from_pretrained(teacher_name_or_path, subfolder="vae", **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(teacher_name_or_path, subfolder="text_encoder", **kwargs)
    pipeline = OneStepPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=teacher.tokenizer, unet=unet, scheduler=scheduler
    )
    pipeline.save_pretrained(output_dir, safe_serialization=True)


def save_model_card(
    output_dir: str,
    base_model: str,
    method_name: str,
    paper: str,
    script: str,
    command: str,
    metrics: dict[str, float],
    hyperparameters: dict,
    t_init: int,
    input_type: str,
    lora_rank: int = 0,
    lora_alpha: int | None = None,
    repo_id: str | None = None,
    validation_images: list[str] | None = None,
    example_prompt: str = "a photo of an astronaut riding a horse",
    tags: list[str] | None = None,
    template: str | os.PathLike | None = None,
) -> ModelCard:
    r"""
    Writes `output_dir/README.md` from the model-card template (`model_cards/onestep_student.md` by default).

    Args:
        base_model (`str`): the teacher's Hub id, recorded as `base_model` (a local path is shown but not recorded).
        method_name, paper, script, command (`str`): what was trained, how (use `format_command`).
        metrics (`dict`): final logged values. hyperparameters (`dict`): settings shown in a table.
        t_init, input_type: the student's scheduler settings, used in the usage snippet.
        lora_rank, lora_alpha: the LoRA student's rank and alpha (`lora_rank=0`: full student).
        repo_id (`str`, *optional*): the Hub repository (defaults to `output_dir`'s name).
        validation_images (`list[str]`, *optional*): images inside `output_dir` to show.
        tags (`list[str]`, *optional*): extra tags.

    Returns:
        The `huggingface_hub.ModelCard`.
    """
    lora = lora_rank > 0
    is_hub_id = not os.path.exists(base_model)
    if not is_hub_id:
        logger.warning(
            f"The teacher {base_model!r} is a local path, which is not valid `base_model` metadata on the Hub: "
            "pass `--hub_base_model <hub id>` to record where it comes from."
        )
    tags = ["text-to-image", "diffusers", "diffusers-onestep", "one-step", "distillation", *(tags or [])]
    tags += ["lora"] if lora else []
    card_data = ModelCardData(
        library_name="diffusers",
        pipeline_tag="text-to-image",
        base_model=base_model if is_hub_id else None,
        tags=list(dict.fromkeys(tags)),
        model_name=repo_id or Path(output_dir).name,
    )
    template = Path(template or MODEL_CARD_DIR / "onestep_student.md")
    if not template.is_file():
        raise FileNotFoundError(f"Model-card template {template} not found: pass `template=` (see model_cards/).")
    card = ModelCard.from_template(
        card_data,
        template_path=str(template),
        model_name=repo_id or Path(output_dir).name,
        repo_id=repo_id or Path(output_dir).name,
        base_model=base_model,
        base_model_url=f"https://huggingface.co/{base_model}" if is_hub_id else base_model,
        method_name=method_name,
        paper=paper,
        script=script,
        command=command,
        metrics={k: f"{v:.6g}" for k, v in metrics.items()},
        hyperparameters=hyperparameters,
        t_init=t_init,
        input_type=input_type,
        lora=lora,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha or lora_rank,
        validation_images=[os.path.relpath(p, output_dir) for p in validation_images or []],
        example_prompt=example_prompt,
    )
    card.save(os.path.join(output_dir, "README.md"))
    return card


def push_to_hub(
    output_dir: str,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload one-step student",
) -> str:
    r"""
    Creates (or reuses) the Hub model repository `repo_id` and uploads `output_dir` to it, leaving out resumable
    checkpoints and tracker logs. Returns the repository id. The token is passed through, never logged.
    """
    repo_id = huggingface_hub.create_repo(repo_id, exist_ok=True, private=private, token=token).repo_id
    huggingface_hub.upload_folder(
        repo_id=repo_id,
        folder_path=output_dir,
        commit_message=commit_message,
        ignore_patterns=["checkpoint-*", ".checkpoint-*"],
        token=token,
    )
    logger.info(f"Uploaded {output_dir} to https://huggingface.co/{repo_id}")
    return repo_id
