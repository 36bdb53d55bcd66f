"""What training needs to know per backbone, in one table (`TRAINING_BACKBONES`, keyed like `models.backbones.BACKBONES`).

Everything else in training (the losses, `student_generate`, the scripts' bodies) holds the conditioning as one dict
and never branches on the backbone. Each entry says:

- which diffusers teacher pipeline classes it accepts (`teacher_pipelines`) and which student pipeline it trains
  (`student_pipeline`: `OneStepPipeline`, `OneStepXLPipeline`, `OneStepPixArtPipeline`);
- how a prompt batch becomes a conditioning dict through **the teacher pipeline's own** `encode_prompt` (SD keeps
  `pipelines.text_encoding.encode_prompt`, which equals SD's), the unconditional branch included (SDXL's zeros for
  the empty prompt when `force_zeros_for_empty_prompt`, PixArt's T5 encoding of `""` with its mask);
- how a LoRA adapter is added to the network (diffusers' `add_adapter` on a UNet; `peft.inject_adapter_in_model` on a
  PixArt transformer, which has no PEFT mixin in diffusers 0.42) and how a trained one is saved so that the student
  pipeline's `from_teacher(teacher, lora=dir)` loads it;
- the network's spatial downsampling (the resolution multiple) and extra student-call arguments.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from ..models.backbones import BACKBONES, backbone_for
from ..pipelines import OneStepPipeline, OneStepPixArtPipeline, OneStepXLPipeline
from ..pipelines.text_encoding import encode_prompt as sd_encode_prompt
from .errors import TrainingArgumentError


__all__ = [
    "TEACHER_PIPELINES",
    "TRAINING_BACKBONES",
    "TrainingBackbone",
    "build_student_pipeline",
    "check_teacher_class",
    "teacher_class_name",
    "training_backbone",
]


@dataclass(frozen=True)
class TrainingBackbone:
    r"""
    The backbone-specific part of training, for one `models.backbones` adapter.

    Args:
        name (`str`): the adapter's name (`"sd"`, `"sdxl"`, `"pixart"`).
        teacher_pipelines (`tuple[str]`): the diffusers pipeline classes accepted as teachers.
        student_pipeline (`type`): the one-step pipeline class the student is saved as.
        encode (`Callable`): `encode(pipe, prompts, device=, dtype=, image_size=, unconditional=)` -> conditioning dict.
        inject_adapter (`Callable`): `inject_adapter(network, lora_config, adapter_name)`.
        downsampling (`Callable`): the network config -> its spatial downsampling (latent pixels per token / cell).
        student_lora_target_modules (`str`): the student LoRA's default target modules (`--student_lora_target_modules`).
        call_kwargs (`dict`): extra arguments of the student pipeline's call at the trained size (validation).
    """

    name: str
    teacher_pipelines: tuple[str, ...]
    student_pipeline: type
    encode: Callable[..., dict]
    inject_adapter: Callable[[torch.nn.Module, LoraConfig, str], None]
    downsampling: Callable[[dict], int]
    student_lora_target_modules: str
    call_kwargs: dict = field(default_factory=dict)

    @property
    def network_attribute(self) -> str:
        return BACKBONES[self.name].network_attribute

    def save_lora(self, directory: str, network: torch.nn.Module, adapter_name: str, *, vae, scheduler) -> None:
        r"""Writes the `adapter_name` LoRA of `network` as the student pipeline's `load_lora_weights` reads it."""
        if self.student_pipeline is OneStepPixArtPipeline:
            # PEFT file with the LoraConfig in its metadata (OneStepPixArtPipeline's own format)
            pipe = OneStepPixArtPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=network,
                                         scheduler=scheduler)  # fmt: skip
            pipe.save_lora_weights(directory, adapter_name=adapter_name)
            return
        # PEFT-format keys, as diffusers' `load_lora_weights` reads them (its `convert_state_dict_to_diffusers` would
        # rename attention layers to the legacy `lora.down/up` format and leave conv layers as they are); the adapter
        # metadata keeps `lora_alpha != r`
        state = get_peft_model_state_dict(network, adapter_name=adapter_name)
        self.student_pipeline.save_lora_weights(
            directory, unet_lora_layers={k: v.detach().float().contiguous() for k, v in state.items()},
            unet_lora_adapter_metadata=network.peft_config[adapter_name].to_dict(), safe_serialization=True,
        )  # fmt: skip


def _float_to(cond: dict, dtype: torch.dtype | None) -> dict:
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() and dtype else v for k, v in cond.items()}


def _encode_sd(pipe, prompts, *, device, dtype, image_size, unconditional):
    prompts = [""] * len(prompts) if unconditional else list(prompts)
    return {"encoder_hidden_states": sd_encode_prompt(pipe.tokenizer, pipe.text_encoder, prompts, device, dtype=dtype)}


def _encode_sdxl(pipe, prompts, *, device, dtype, image_size, unconditional):
    # SDXL's own encoding; the unconditional branch is its negative for no negative prompt (zeros when the teacher's
    # `force_zeros_for_empty_prompt`), as its CFG uses it
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompt=list(prompts), device=device, num_images_per_prompt=1, do_classifier_free_guidance=unconditional
    )
    if unconditional:
        embeds, pooled = negative, negative_pooled
    time_ids = pipe._get_add_time_ids(
        tuple(image_size), (0, 0), tuple(image_size), dtype=embeds.dtype,
        text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
    )  # fmt: skip
    cond = {"encoder_hidden_states": embeds, "text_embeds": pooled, "time_ids": time_ids.repeat(len(prompts), 1)}
    return _float_to({k: v.to(device) for k, v in cond.items()}, dtype)


def _encode_pixart(pipe, prompts, *, device, dtype, image_size, unconditional):
    # PixArt's own T5 encoding with its attention mask; the unconditional branch is its negative for `""`
    embeds, mask, negative, negative_mask = pipe.encode_prompt(
        list(prompts), do_classifier_free_guidance=unconditional, negative_prompt="", num_images_per_prompt=1,
        device=device,
    )  # fmt: skip
    if unconditional:
        embeds, mask = negative, negative_mask
    cond = {"encoder_hidden_states": embeds, "encoder_attention_mask": mask, "resolution": None, "aspect_ratio": None}
    if pipe.transformer.use_additional_conditions:
        height, width = image_size
        cond["resolution"] = torch.tensor([[height, width]], device=device, dtype=embeds.dtype).repeat(len(prompts), 1)
        cond["aspect_ratio"] = torch.tensor([[height / width]], device=device, dtype=embeds.dtype).repeat(
            len(prompts), 1
        )
    return _float_to(cond, dtype)


def _add_unet_adapter(network, config: LoraConfig, adapter_name: str) -> None:
    network.add_adapter(config, adapter_name=adapter_name)


def _inject_adapter(network, config: LoraConfig, adapter_name: str) -> None:
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, network, adapter_name=adapter_name)


def _unet_downsampling(config) -> int:
    return 2 ** (len(config["block_out_channels"]) - 1)


def _patch_size(config) -> int:
    return config["patch_size"]


# a UNet student's LoRA: attention, its projections, feed-forward and the resnets (diffusers' LCM-LoRA choice)
_UNET_LORA = "to_q,to_k,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2,conv1,conv2,conv_shortcut,time_emb_proj"
# a DiT student's LoRA: self- and cross-attention and the feed-forward of every block (*unverified* for PixArt)
_DIT_LORA = "to_q,to_k,to_v,to_out.0,ff.net.0.proj,ff.net.2"

TRAINING_BACKBONES: dict[str, TrainingBackbone] = {
    entry.name: entry
    for entry in (
        TrainingBackbone("sd", ("StableDiffusionPipeline",), OneStepPipeline, _encode_sd, _add_unet_adapter,
                         _unet_downsampling, _UNET_LORA),
        TrainingBackbone("sdxl", ("StableDiffusionXLPipeline",), OneStepXLPipeline, _encode_sdxl, _add_unet_adapter,
                         _unet_downsampling, _UNET_LORA),
        # validation generates at the trained size: no resizing through PixArt's aspect-ratio bins
        TrainingBackbone("pixart", ("PixArtAlphaPipeline", "PixArtSigmaPipeline"), OneStepPixArtPipeline,
                         _encode_pixart, _inject_adapter, _patch_size, _DIT_LORA, {"use_resolution_binning": False}),
    )
}  # fmt: skip
# teacher pipeline class -> backbone name
TEACHER_PIPELINES: dict[str, str] = {cls: e.name for e in TRAINING_BACKBONES.values() for cls in e.teacher_pipelines}


def check_teacher_class(class_name: str | None, name: str = "--pretrained_teacher_model_name_or_path") -> TrainingBackbone:
    r"""The table entry of a teacher pipeline class; a `TrainingArgumentError` naming it and the supported ones else."""
    if class_name not in TEACHER_PIPELINES:
        supported = ", ".join(f"{cls} ({entry})" for cls, entry in TEACHER_PIPELINES.items())
        raise TrainingArgumentError(
            f"`{name}`: the teacher is a {class_name or 'pipeline without a `_class_name`'}, which training does not "
            f"support; supported teacher pipelines are {supported}."
        )
    return TRAINING_BACKBONES[TEACHER_PIPELINES[class_name]]


def training_backbone(network: torch.nn.Module) -> TrainingBackbone:
    r"""The table entry of a denoising network (`models.backbones.backbone_for`)."""
    return TRAINING_BACKBONES[backbone_for(network).name]


def build_student_pipeline(teacher_pipeline, network: torch.nn.Module, scheduler, backbone: TrainingBackbone | None = None):
    r"""
    The student pipeline (`backbone.student_pipeline`) from a teacher pipeline's VAE, text encoders and tokenizers (shared,
    not copied), the student `network` and its `scheduler`.
    """
    backbone = backbone or training_backbone(network)
    cls = backbone.student_pipeline
    parts = {name: getattr(teacher_pipeline, name) for name in cls._teacher_components}
    return cls(**parts, **{backbone.network_attribute: network}, scheduler=scheduler)


def teacher_class_name(pretrained_model_name_or_path: str, *, revision: str | None = None) -> str | None:
    r"""
    The `_class_name` of a teacher's `model_index.json`, read without loading anything: from the directory where the
    path is local, else through `DiffusionPipeline.load_config` (the Hub or its cache). `None` when it cannot be read.
    """
    import json

    path = str(pretrained_model_name_or_path)
    if os.path.isdir(path):
        index = os.path.join(path, "model_index.json")
        if not os.path.isfile(index):
            return None
        with open(index, encoding="utf-8") as file:
            return json.load(file).get("_class_name")
    try:
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.load_config(path, revision=revision).get("_class_name")
    except Exception:  # unreachable Hub, unknown id: the loader reports it, and the class is checked after loading
        return None
