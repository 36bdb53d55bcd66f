"""Accelerator, teacher, student and fake-score setup shared by the distillation scripts.

Memory layout (ARCHITECTURE.md rule 6): the fake score is always a LoRA adapter on the teacher's frozen UNet. A LoRA
student is a second adapter on that **same** UNet, so teacher (adapters off), fake score and student share one frozen
copy of the base weights; a full student is a trainable float32 copy next to it. `AdapterView` switches adapters per
call and keeps `requires_grad` of every trainable adapter as set up (peft's `set_adapter` would turn it off for the
inactive one).
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass

import diffusers
import torch
import torch.nn.functional as F
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer


__all__ = [
    "FAKE_SCORE_ADAPTER",
    "STUDENT_ADAPTER",
    "AdapterView",
    "DistillationUNets",
    "TeacherComponents",
    "add_lora_adapter",
    "build_distillation_unets",
    "clip_embeddings",
    "load_clip",
    "load_teacher",
    "make_optimizer",
    "setup_accelerator",
    "weight_dtype",
]

logger = get_logger(__name__)

STUDENT_ADAPTER = "student"
FAKE_SCORE_ADAPTER = "fake_score"


def setup_accelerator(args, find_unused_parameters: bool = False) -> Accelerator:
    r"""
    The `Accelerator` of a run: mixed precision, gradient accumulation, tracker (`args.report_to`), seeding, TF32 and
    logging on the main process only. `find_unused_parameters` is needed under DDP when one module holds two
    trainable adapters that are trained in turns (a LoRA student).
    """
    project_config = ProjectConfiguration(
        project_dir=args.output_dir, logging_dir=f"{args.output_dir}/{args.logging_dir}"
    )
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=project_config,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_info()
    else:
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    if args.seed is not None:
        set_seed(args.seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


def weight_dtype(accelerator: Accelerator) -> torch.dtype:
    r"""The dtype of frozen weights: bf16 / fp16 under mixed precision, float32 otherwise."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


@dataclass
class TeacherComponents:
    r"""The frozen parts of a Stable-Diffusion-like teacher (a UNet, a VAE, one CLIP text encoder)."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    scheduler: DDPMScheduler


def load_teacher(
    pretrained_model_name_or_path: str,
    revision: str | None = None,
    variant: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> TeacherComponents:
    r"""
    Loads a text-to-image teacher from a diffusers directory or Hub id (safetensors only), frozen, on `device`. The
    text encoder and VAE are cast to `dtype`; the UNet stays float32 so that a full student copies exact weights
    (`build_distillation_unets` casts its frozen part). Only the UNet, VAE, text encoder, tokenizer and scheduler
    config are read (no safety checker).
    """
    kwargs = {"revision": revision, "variant": variant, "use_safetensors": True}
    path = pretrained_model_name_or_path
    try:
        config = UNet2DConditionModel.load_config(path, subfolder="unet", revision=revision)
    except OSError as error:
        raise ValueError(
            f"`--pretrained_teacher_model_name_or_path`: could not read `unet/config.json` from {path!r} ({error}). "
            "Pass a Stable-Diffusion-like diffusers directory or Hub id (UNet2DConditionModel, CLIP text encoder, VAE)."
        ) from error
    if config.get("_class_name") != "UNet2DConditionModel":
        raise ValueError(
            f"The teacher's UNet is a {config.get('_class_name')}; only UNet2DConditionModel is supported."
        )
    teacher = TeacherComponents(
        tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision),
        text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kwargs),
        vae=AutoencoderKL.from_pretrained(path, subfolder="vae", **kwargs),
        unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kwargs),
        scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=revision),
    )
    for model in (teacher.text_encoder, teacher.vae):
        model.requires_grad_(False).eval().to(device=device, dtype=dtype)
    teacher.unet.requires_grad_(False).eval().to(device=device)
    return teacher


def add_lora_adapter(
    unet: UNet2DConditionModel, adapter_name: str, rank: int, alpha: int | None = None, target_modules: str = ""
) -> list[torch.nn.Parameter]:
    r"""
    Adds a trainable LoRA adapter (`lora_B` zero-initialised, so the UNet is unchanged at first) and returns its
    parameters; trainable parameters are cast to float32. `target_modules` is a comma-separated list of module names.
    """
    targets = [name.strip() for name in target_modules.split(",") if name.strip()]
    if not targets:
        raise ValueError(f"The LoRA target modules of adapter {adapter_name!r} are empty.")
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=targets)
    with warnings.catch_warnings():  # several adapters on one base is the point here (ARCHITECTURE.md rule 6)
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        unet.add_adapter(config, adapter_name=adapter_name)
    params = [p for name, p in unet.named_parameters() if f".{adapter_name}." in name]
    for p in params:
        p.requires_grad_(True)
    cast_training_params(unet, dtype=torch.float32)
    return params


class AdapterView:
    r"""
    A callable view of a (possibly DDP-wrapped) UNet with one adapter active (`adapter_name`) or all adapters off
    (`adapter_name=None`, the teacher). It exposes `dtype` (read once, at construction), so `Denoiser` and
    `student_generate` accept it. Switching touches only the LoRA layers (found once per set of adapters) and leaves
    `requires_grad` of every adapter parameter as it was.

    Args:
        model (`torch.nn.Module`): what is called (the prepared module when gradients must sync under DDP).
        adapter_name (`str`, *optional*): the adapter to activate; `None` disables all adapters.
        base (`UNet2DConditionModel`, *optional*): the unwrapped UNet (defaults to `model`).
    """

    def __init__(self, model, adapter_name: str | None, base: UNet2DConditionModel | None = None):
        self.model, self.adapter_name, self.base = model, adapter_name, base if base is not None else model
        self.dtype = self.base.dtype

    def activate(self) -> None:
        r"""Makes this view's adapter state current on `base` (a no-op when it already is)."""
        base = self.base
        if not getattr(base, "_hf_peft_config_loaded", False):
            return
        adapters = tuple(base.peft_config)
        cache = base.__dict__.get("_onestep_adapter_state")
        if cache is None or cache["adapters"] != adapters:
            layers = [m for m in base.modules() if isinstance(m, BaseTunerLayer)]
            params = [p for layer in layers for name, p in layer.named_parameters() if "base_layer" not in name]
            direct = all(hasattr(m, "_active_adapter") and hasattr(m, "_disable_adapters") for m in layers)
            cache = {"adapters": adapters, "layers": layers, "params": params, "direct": direct}
            base.__dict__["_onestep_adapter_state"] = cache
        name, first = self.adapter_name, cache["layers"][0] if cache["layers"] else None
        if (
            first is None
            or (first.disable_adapters and name is None)
            or (not first.disable_adapters and first.active_adapters == [name])
        ):  # already current (read from the layers, so a switch made elsewhere is noticed)
            return
        if cache["direct"]:
            # peft's own layer state, set directly: what `set_adapter` / `enable_adapters` end with, without
            # rewriting `requires_grad` on every adapter
            for layer in cache["layers"]:
                layer._disable_adapters = name is None
                if name is not None:
                    layer._active_adapter = [name]
        else:  # the public path, then `requires_grad` restored
            requires_grad = [p.requires_grad for p in cache["params"]]
            for layer in cache["layers"]:
                layer.enable_adapters(name is not None)
                if name is not None:
                    layer.set_adapter(name)
            for p, flag in zip(cache["params"], requires_grad):
                p.requires_grad_(flag)

    def __call__(self, *args, **kwargs):
        self.activate()
        return self.model(*args, **kwargs)


@dataclass
class DistillationUNets:
    r"""
    The UNets of a student / teacher / fake-score run.

    Args:
        student (`UNet2DConditionModel`): the module holding the student's weights (the shared UNet for a LoRA
            student).
        teacher (`UNet2DConditionModel`): the frozen base, carrying the fake-score adapter (and the LoRA student).
        student_parameters, fake_score_parameters (`list`): the trainable parameters of each role.
        shared (`bool`): whether student and teacher are one module (LoRA student).
    """

    student: UNet2DConditionModel
    teacher: UNet2DConditionModel
    student_parameters: list
    fake_score_parameters: list
    shared: bool

    @property
    def student_adapter(self) -> str | None:
        return STUDENT_ADAPTER if self.shared else None


def build_distillation_unets(
    teacher_unet: UNet2DConditionModel,
    student_lora_rank: int = 0,
    student_lora_alpha: int | None = None,
    student_lora_target_modules: str = "to_q,to_k,to_v,to_out.0",
    fake_score_lora_rank: int = 64,
    fake_score_lora_alpha: int | None = 128,
    fake_score_lora_target_modules: str = "to_q,to_k,to_v,to_out.0",
    gradient_checkpointing: bool = False,
    dtype: torch.dtype = torch.float32,
) -> DistillationUNets:
    r"""
    Builds the student (full float32 copy when `student_lora_rank == 0`, else a LoRA adapter on `teacher_unet`) and
    the fake score (a LoRA adapter on `teacher_unet`), then casts the frozen base to `dtype`. Trainable parameters
    stay float32 (mixed precision runs them under autocast).
    """
    student = None
    if student_lora_rank == 0:
        student = copy.deepcopy(teacher_unet).float().train().requires_grad_(True)
    fake_params = add_lora_adapter(
        teacher_unet, FAKE_SCORE_ADAPTER, fake_score_lora_rank, fake_score_lora_alpha, fake_score_lora_target_modules
    )
    if student is None:
        student_params = add_lora_adapter(
            teacher_unet, STUDENT_ADAPTER, student_lora_rank, student_lora_alpha, student_lora_target_modules
        )
        for p in fake_params:  # add_adapter's set_adapter froze the first adapter
            p.requires_grad_(True)
        student = teacher_unet
    else:
        student_params = list(student.parameters())
    teacher_unet.to(dtype=dtype)
    cast_training_params([teacher_unet, student], dtype=torch.float32)
    if gradient_checkpointing:
        for unet in {id(m): m for m in (student, teacher_unet)}.values():
            unet.enable_gradient_checkpointing()
    return DistillationUNets(student, teacher_unet, student_params, fake_params, shared=student is teacher_unet)


def make_optimizer(
    params: list[torch.nn.Parameter],
    learning_rate: float,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 1e-2,
    eps: float = 1e-8,
    use_8bit_adam: bool = False,
) -> torch.optim.Optimizer:
    r"""AdamW (bitsandbytes' 8-bit AdamW with `use_8bit_adam`) over `params`."""
    if use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_cls = bnb.optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW
    return optimizer_cls(params, lr=learning_rate, betas=betas, weight_decay=weight_decay, eps=eps)


_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_clip(
    pretrained_model_name_or_path: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> tuple[CLIPModel, CLIPTokenizer]:
    r"""A frozen `CLIPModel` and its tokenizer (safetensors only), for the optional clamped CLIP loss."""
    model = CLIPModel.from_pretrained(pretrained_model_name_or_path, use_safetensors=True)
    model.requires_grad_(False).eval().to(device=device, dtype=dtype)
    return model, CLIPTokenizer.from_pretrained(pretrained_model_name_or_path)


def clip_embeddings(
    clip_model: CLIPModel, clip_tokenizer: CLIPTokenizer, images: torch.Tensor, prompts: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    CLIP image and text projections, differentiable with respect to `images` (`(batch, 3, H, W)` in `[-1, 1]`, as the
    VAE decodes): resized to CLIP's input size and normalised with CLIP's mean and std.
    """
    size = clip_model.config.vision_config.image_size
    pixels = F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False)
    mean = torch.tensor(_CLIP_MEAN, device=images.device).reshape(1, 3, 1, 1)
    std = torch.tensor(_CLIP_STD, device=images.device).reshape(1, 3, 1, 1)
    pixels = (((pixels + 1) / 2).clamp(0, 1) - mean) / std
    image_embeds = clip_model.get_image_features(pixel_values=pixels.to(clip_model.dtype))
    input_ids = clip_tokenizer(
        prompts, padding="max_length", max_length=clip_tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(images.device)
    text_embeds = clip_model.get_text_features(input_ids=input_ids)
    return _as_tensor(image_embeds), _as_tensor(text_embeds)


def _as_tensor(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output
