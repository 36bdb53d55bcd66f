"""Accelerator, teacher, student and fake-score setup shared by the distillation scripts.

Memory layout (ARCHITECTURE.md rule 6): the fake score is always a LoRA adapter on the teacher's frozen network (a
UNet, or a PixArt transformer). A LoRA student is a second adapter on that **same** network, so teacher (adapters off), fake score and student share one frozen
copy of the base weights; a full student is a trainable float32 copy next to it. `AdapterView` switches adapters per
call through peft's public layer API and keeps `requires_grad` of every trainable adapter as set up (peft's
`set_adapter` alone would turn it off for the inactive one). The teacher is read in one place, `load_teacher`
(`DiffusionPipeline.from_pretrained(..., use_safetensors=True)` through `pipelines.loading.load_pipeline`); what
differs per backbone (teacher classes, prompt encoding, LoRA injection, student pipeline) is one table,
`training_utils.backbones.TRAINING_BACKBONES`.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from dataclasses import dataclass

import diffusers
import torch
import torch.nn.functional as F
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import CLIPModel, CLIPTokenizer

from ..models.backbones import backbone_for
from .backbones import TrainingBackbone, check_teacher_class, teacher_class_name, training_backbone
from .errors import TrainingArgumentError


__all__ = [
    "FAKE_SCORE_ADAPTER",
    "OPTIMIZERS",
    "STUDENT_ADAPTER",
    "AdapterView",
    "DistillationUNets",
    "TeacherComponents",
    "add_lora_adapter",
    "build_distillation_unets",
    "clip_embeddings",
    "encode_prompts",
    "load_clip",
    "load_teacher",
    "make_optimizer",
    "setup_accelerator",
    "teacher_latent_shape",
    "weight_dtype",
]

logger = get_logger(__name__)

STUDENT_ADAPTER = "student"
FAKE_SCORE_ADAPTER = "fake_score"


def setup_accelerator(args, *, find_unused_parameters: bool = False) -> Accelerator:
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
    _check_distributed_setup(accelerator)
    if accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_info()
    else:
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    if args.seed is not None:  # one stream per rank (dropout masks differ across ranks; all data draws are per step)
        set_seed(args.seed, device_specific=True)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


def _check_distributed_setup(accelerator: Accelerator) -> None:
    """Refuses launched ranks that share no process group; says when accelerate ignored an FSDP config."""
    import accelerate

    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world_size > 1 and accelerator.num_processes == 1:
        # e.g. an FSDP or multi-GPU config without `use_cpu` on a machine without GPUs: every rank would train alone
        # and all of them would write `--output_dir`
        raise TrainingArgumentError(
            f"`accelerate launch` started {world_size} processes, but accelerate {accelerate.__version__} set up no "
            f"process group ({accelerator.distributed_type}): on CPUs launch with `ACCELERATE_USE_CPU=1` (or "
            "`use_cpu: true` in the config) and `--multi_gpu`, which gives DDP over gloo."
        )
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and accelerator.distributed_type.value != "FSDP":
        logger.warning(
            f"The FSDP config was ignored: accelerate {accelerate.__version__} enables FSDP only on accelerators "
            f"(GPU, NPU, XPU, ...), and this run is {accelerator.distributed_type} (plain data parallel: each rank "
            "holds the whole model)."
        )


def weight_dtype(accelerator: Accelerator) -> torch.dtype:
    r"""The dtype of frozen weights: bf16 / fp16 under mixed precision, float32 otherwise."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


@dataclass
class TeacherComponents:
    r"""
    A frozen teacher: the diffusers pipeline it was loaded as, its denoising network (a `UNet2DConditionModel` or a
    `PixArtTransformer2DModel`), the training noise schedule and the backbone's training entry.

    Args:
        pipeline (`DiffusionPipeline`): the teacher pipeline (`StableDiffusionPipeline`, `StableDiffusionXLPipeline`,
            `PixArtAlphaPipeline`, `PixArtSigmaPipeline`); its own `encode_prompt` gives the conditioning.
        network (`torch.nn.Module`, *optional*): the teacher's UNet or transformer (`None` with `load_network=False`).
        scheduler (`DDPMScheduler`): the training noise schedule.
        backbone (`TrainingBackbone`): the backbone's row of `TRAINING_BACKBONES`.
    """

    pipeline: DiffusionPipeline
    network: torch.nn.Module | None
    scheduler: DDPMScheduler
    backbone: TrainingBackbone

    @property
    def unet(self) -> torch.nn.Module | None:
        r"""The denoising network (a UNet, or PixArt's transformer); kept under its SD name for older callers."""
        return self.network

    @property
    def vae(self) -> AutoencoderKL:
        return self.pipeline.vae

    @property
    def text_encoder(self):
        return self.pipeline.text_encoder

    @property
    def tokenizer(self):
        return self.pipeline.tokenizer

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def generation_kwargs(self, latent_shape: tuple[int, int, int]) -> dict:
        r"""The student pipeline's call arguments for images of the trained `latent_shape` (validation)."""
        height, width = (size * self.vae_scale_factor for size in latent_shape[1:])
        return {"height": height, "width": width, **self.backbone.call_kwargs}


def load_teacher(
    pretrained_model_name_or_path: str,
    *,
    revision: str | None = None,
    variant: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    load_network: bool = True,
    load_unet: bool | None = None,
) -> TeacherComponents:
    r"""
    Loads a text-to-image teacher (SD 1.x / 2.x, SDXL, PixArt-α / Σ) from a diffusers directory or Hub id with
    `DiffusionPipeline.from_pretrained(..., use_safetensors=True)` (`pipelines.loading.load_pipeline`; no safety
    checker), frozen, in eval mode, on `device`. Any other pipeline class is refused before anything is loaded where
    the path is local (its `model_index.json` is read first), with an error that names it and lists the supported
    ones. Text encoders and VAE are loaded in `dtype` (the training dtype); the network (UNet or transformer) in
    float32 so that a full student copies exact weights (`build_distillation_unets` casts its frozen part). The
    pipeline's scheduler config becomes a `DDPMScheduler` (the training noise schedule).

    Args:
        pretrained_model_name_or_path (`str`): `--pretrained_teacher_model_name_or_path`.
        revision, variant (`str`, *optional*): of the teacher on the Hub.
        dtype (`torch.dtype`): the dtype of the text encoders and VAE.
        device: where the components go.
        load_network (`bool`, defaults to `True`): `False` reads everything but the UNet / transformer (`network` is
            then `None`). `load_unet` is its older name.
    """
    from ..pipelines.loading import load_pipeline

    load_network = load_network if load_unet is None else load_unet
    flag = "--pretrained_teacher_model_name_or_path"
    class_name = teacher_class_name(pretrained_model_name_or_path, revision=revision)
    backbone = check_teacher_class(class_name, flag) if class_name is not None else None
    kwargs = {"revision": revision, "variant": variant, "dtype": {"unet": torch.float32, "transformer": torch.float32,
                                                                  "default": dtype}}  # fmt: skip
    if not load_network and backbone is not None:
        kwargs[backbone.network_attribute] = None
    try:
        pipe = load_pipeline(pretrained_model_name_or_path, name=flag, **kwargs)
    except OSError as error:
        raise TrainingArgumentError(
            f"`{flag}`: could not load {pretrained_model_name_or_path!r} as a diffusers pipeline ({error})."
        ) from error
    backbone = check_teacher_class(type(pipe).__name__, flag)
    network = getattr(pipe, backbone.network_attribute, None) if load_network else None
    if load_network:
        found = backbone_for(network).name if isinstance(network, torch.nn.Module) else None
        if found != backbone.name:
            raise TrainingArgumentError(
                f"`{flag}`: the teacher is a {type(pipe).__name__} but its `{backbone.network_attribute}` is a "
                f"{type(network).__name__} ({found or 'no known backbone'}); expected a {backbone.name} network."
            )
    teacher = TeacherComponents(
        pipeline=pipe, network=network, scheduler=DDPMScheduler.from_config(pipe.scheduler.config), backbone=backbone
    )
    for model in pipe.components.values():
        if isinstance(model, torch.nn.Module):
            model.requires_grad_(False).eval().to(device=device)
    if not load_network and getattr(pipe, backbone.network_attribute, None) is not None:
        setattr(pipe, backbone.network_attribute, None)
    return teacher


def encode_prompts(
    teacher: TeacherComponents,
    prompts: list[str],
    *,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    resolution: int | None = None,
    unconditional: bool = False,
) -> dict:
    r"""
    The conditioning dict of `prompts` for every role (student, teacher, fake score), from the teacher pipeline's own
    `encode_prompt` (`TrainingBackbone.encode`); with `unconditional=True`, the teacher's unconditional branch for
    each row (what its CFG uses). Size conditions (SDXL `time_ids`, PixArt `resolution`) are those of `resolution`
    (default: the network's sample size), as in `teacher_latent_shape`.

    Returns:
        `dict` of `(len(prompts), ...)` tensors (see `models.backbones`).
    """
    _, height, width = teacher_latent_shape(teacher, resolution)
    image_size = (height * teacher.vae_scale_factor, width * teacher.vae_scale_factor)
    return teacher.backbone.encode(
        teacher.pipeline, prompts, device=device, dtype=dtype, image_size=image_size, unconditional=unconditional
    )


def teacher_latent_shape(teacher: TeacherComponents, resolution: int | None = None) -> tuple[int, int, int]:
    r"""
    The student's latent shape `(channels, height, width)` at `resolution` (default: the network's sample size times
    the VAE factor). Raises `TrainingArgumentError` when `--resolution` is <= 0 or not a multiple of the VAE factor
    times the network's downsampling (a UNet's levels, a transformer's patch size).
    """
    config = teacher.network.config
    vae_factor = teacher.vae_scale_factor
    multiple = vae_factor * teacher.backbone.downsampling(config)
    resolution = config.sample_size * vae_factor if resolution is None else resolution
    if resolution <= 0 or resolution % multiple:
        raise TrainingArgumentError(
            f"`--resolution` must be a positive multiple of {multiple} for this teacher (VAE factor {vae_factor} x the "
            f"network's downsampling {multiple // vae_factor}), got {resolution}."
        )
    return config.in_channels, resolution // vae_factor, resolution // vae_factor


def _lora_target_names(unet: torch.nn.Module) -> list[str]:
    names = set()
    for name, module in unet.named_modules():
        if "lora_" in name or "base_layer" in name:
            continue
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and not isinstance(module, BaseTunerLayer):
            parts = name.split(".")
            names.add(".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1])
    return sorted(n for n in names if "base_layer" not in n and "lora_" not in n)


def add_lora_adapter(
    unet: torch.nn.Module,
    *,
    adapter_name: str,
    rank: int,
    alpha: int | None = None,
    target_modules: str = "",
    argument_prefix: str | None = None,
) -> list[torch.nn.Parameter]:
    r"""
    Adds a trainable LoRA adapter (`lora_B` zero-initialised, so the network is unchanged at first) and returns its
    parameters; trainable parameters are cast to float32. The adapter is added the backbone's way
    (`TrainingBackbone.inject_adapter`: diffusers' `add_adapter` on a UNet, `peft.inject_adapter_in_model` on a
    PixArt transformer); several adapters share the network's one copy of the base weights.

    Args:
        unet (`UNet2DConditionModel` or `PixArtTransformer2DModel`): the network to adapt.
        adapter_name (`str`): the adapter's name.
        rank, alpha (`int`): LoRA rank (>= 1) and alpha (defaults to the rank).
        target_modules (`str`): comma-separated module names (a name matches a module whose path ends with it).
        argument_prefix (`str`, *optional*): the flags' prefix in error messages (e.g. `"fake_score_lora"`).
    """
    prefix = argument_prefix or f"{adapter_name}_lora"
    if rank < 1:
        raise TrainingArgumentError(f"`--{prefix}_rank` must be >= 1, got {rank}.")
    targets = [name.strip() for name in target_modules.split(",") if name.strip()]
    if not targets:
        raise TrainingArgumentError(f"`--{prefix}_target_modules` is empty: name the modules the adapter adapts.")
    module_names = [name for name, _ in unet.named_modules()]
    unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in module_names)]
    if unknown:
        raise TrainingArgumentError(
            f"`--{prefix}_target_modules`: {unknown} match no module of the {type(unet).__name__}; its adaptable layers are named "
            f"{_lora_target_names(unet)}."
        )
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=targets)
    with warnings.catch_warnings():  # several adapters on one base is the point here (ARCHITECTURE.md rule 6)
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        training_backbone(unet).inject_adapter(unet, config, adapter_name)
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
        base (`UNet2DConditionModel` or `PixArtTransformer2DModel`, *optional*): the unwrapped network (defaults to
            `model`).
    """

    def __init__(self, model, adapter_name: str | None, base: torch.nn.Module | None = None):
        self.model, self.adapter_name, self.base = model, adapter_name, base if base is not None else model
        self.dtype = self.base.dtype

    def activate(self) -> None:
        r"""Makes this view's adapter state current on `base` (a no-op when it already is)."""
        base = self.base
        if not getattr(base, "peft_config", None):  # diffusers' add_adapter and peft's inject both set it
            return
        adapters = tuple(base.peft_config)
        cache = base.__dict__.get("_onestep_adapter_layers")
        if cache is None or cache[0] != adapters:
            cache = (adapters, [m for m in base.modules() if isinstance(m, BaseTunerLayer)])
            base.__dict__["_onestep_adapter_layers"] = cache
        name, layers = self.adapter_name, cache[1]
        if not layers:
            return
        first = layers[0]
        if (first.disable_adapters and name is None) or (not first.disable_adapters and first.active_adapters == [name]):
            return  # already current (read from the layers, so a switch made elsewhere is noticed)
        # peft's public layer API; `set_adapter` / `enable_adapters` also rewrite requires_grad, so the adapters that
        # were trainable (read on the first layer holding each: an adapter is trainable as a whole) are made
        # trainable again
        trainable, seen = [], set()
        for layer in layers:
            for attr in layer.adapter_layer_names:
                for key, module in getattr(layer, attr).items():
                    if key not in seen:
                        seen.add(key)
                        if any(p.requires_grad for p in module.parameters()):
                            trainable.append(key)
            if len(seen) == len(adapters):
                break
        keep = [key for key in trainable if key != name]  # what the switch below would freeze
        for layer in layers:
            if name is None:
                layer.enable_adapters(False)  # freezes every adapter
            else:
                if layer.disable_adapters:
                    layer.enable_adapters(True)
                # `name` trainable as before, every other adapter frozen
                layer.set_adapter(name, inference_mode=name not in trainable)
            restore = trainable if name is None else keep
            if restore:
                if hasattr(layer, "set_requires_grad"):
                    layer.set_requires_grad(restore, requires_grad=True)
                else:  # peft < 0.18
                    for attr in layer.adapter_layer_names:
                        for key, module in getattr(layer, attr).items():
                            if key in restore:
                                module.requires_grad_(True)

    def __call__(self, *args, **kwargs):
        self.activate()
        return self.model(*args, **kwargs)


@dataclass
class DistillationUNets:
    r"""
    The networks of a student / teacher / fake-score run (UNets, or PixArt transformers: the name is historical).

    Args:
        student (`UNet2DConditionModel` or `PixArtTransformer2DModel`): the module holding the student's weights (the
            shared network for a LoRA student).
        teacher (same class): the frozen base, carrying the fake-score adapter (and the LoRA student).
        student_parameters, fake_score_parameters (`list`): the trainable parameters of each role.
        shared (`bool`): whether student and teacher are one module (LoRA student).
        fake_score (*optional*): the fake score's own module when it is a full trainable copy (SiD); `None` when it
            is the LoRA adapter on `teacher` or when there is none (`fake_score_parameters` is then empty).
    """

    student: torch.nn.Module
    teacher: torch.nn.Module
    student_parameters: list
    fake_score_parameters: list
    shared: bool
    fake_score: torch.nn.Module | None = None

    @property
    def student_adapter(self) -> str | None:
        return STUDENT_ADAPTER if self.shared else None


def build_distillation_unets(
    teacher_unet: torch.nn.Module,
    *,
    student_lora_rank: int = 0,
    student_lora_alpha: int | None = None,
    student_lora_target_modules: str | None = "to_q,to_k,to_v,to_out.0",
    fake_score_lora_rank: int | None = 64,
    fake_score_lora_alpha: int | None = 128,
    fake_score_lora_target_modules: str = "to_q,to_k,to_v,to_out.0",
    gradient_checkpointing: bool = False,
    dtype: torch.dtype = torch.float32,
) -> DistillationUNets:
    r"""
    Builds the student (full float32 copy when `student_lora_rank == 0`, else a LoRA adapter on `teacher_unet`) and
    the fake score (a LoRA adapter on `teacher_unet`, or with `fake_score_lora_rank == 0` a full float32 copy of it,
    as SiD trains it; `None`: no fake score, as consistency tuning), then casts the frozen base to `dtype`. Trainable parameters
    stay float32 (mixed precision runs them under autocast). `teacher_unet` is a UNet or a PixArt transformer;
    `student_lora_target_modules=None` takes the backbone's default (`TrainingBackbone.student_lora_target_modules`).
    """
    student = fake_score = None
    if student_lora_rank == 0:
        student = copy.deepcopy(teacher_unet).float().train().requires_grad_(True)
    if fake_score_lora_rank is None:
        fake_params = []
    elif fake_score_lora_rank == 0:
        fake_score = copy.deepcopy(teacher_unet).float().train().requires_grad_(True)
        fake_params = list(fake_score.parameters())
    else:
        fake_params = add_lora_adapter(
            teacher_unet,
            adapter_name=FAKE_SCORE_ADAPTER,
            rank=fake_score_lora_rank,
            alpha=fake_score_lora_alpha,
            target_modules=fake_score_lora_target_modules,
        )
    if student is None:
        student_params = add_lora_adapter(
            teacher_unet,
            adapter_name=STUDENT_ADAPTER,
            rank=student_lora_rank,
            alpha=student_lora_alpha,
            target_modules=student_lora_target_modules or training_backbone(teacher_unet).student_lora_target_modules,
        )
        for p in fake_params:  # add_adapter's set_adapter froze the first adapter
            p.requires_grad_(True)
        student = teacher_unet
    else:
        student_params = list(student.parameters())
    if any(p.dtype != dtype for p in teacher_unet.parameters()):  # diffusers 0.42 warns on every cast, even a no-op
        teacher_unet.to(dtype=dtype)
    cast_training_params([teacher_unet, student], dtype=torch.float32)
    if gradient_checkpointing:
        for unet in {id(m): m for m in (student, teacher_unet, fake_score) if m is not None}.values():
            unet.enable_gradient_checkpointing()
    return DistillationUNets(student, teacher_unet, student_params, fake_params, shared=student is teacher_unet,
                             fake_score=fake_score)  # fmt: skip


OPTIMIZERS = ("adamw", "radam")


def make_optimizer(
    params: list[torch.nn.Parameter],
    *,
    learning_rate: float,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 1e-2,
    eps: float = 1e-8,
    use_8bit_adam: bool = False,
    name: str = "adamw",
) -> torch.optim.Optimizer:
    r"""
    AdamW (bitsandbytes' 8-bit AdamW with `use_8bit_adam`), or with `name="radam"` torch's RAdam with decoupled weight
    decay (ECT's optimizer), over `params`.
    """
    if name not in OPTIMIZERS:
        raise TrainingArgumentError(f"`--optimizer` must be one of {OPTIMIZERS}, got {name!r}.")
    if name == "radam":
        if use_8bit_adam:
            raise TrainingArgumentError("`--use_8bit_adam` is an AdamW option; drop it or use `--optimizer adamw`.")
        return torch.optim.RAdam(params, lr=learning_rate, betas=betas, weight_decay=weight_decay, eps=eps,
                                 decoupled_weight_decay=True)  # fmt: skip
    if use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_cls = bnb.optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW
    return optimizer_cls(params, lr=learning_rate, betas=betas, weight_decay=weight_decay, eps=eps)


_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_clip(
    pretrained_model_name_or_path: str, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
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
