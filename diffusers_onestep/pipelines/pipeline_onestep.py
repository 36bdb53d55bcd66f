"""`OneStepPipeline`: text-to-image in one (or a few) network evaluations from a distilled student UNet."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.loaders import StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.utils import USE_PEFT_BACKEND, BaseOutput, logging, scale_lora_layers, unscale_lora_layers
from transformers import CLIPTextModel, CLIPTokenizer

from ..attention.nasa import check_nasa_scale
from ..schedulers.scheduling_consistency_student import ConsistencyStudentScheduler
from .loading import OneStepLoadingMixin
from .pipeline_utils import (
    OneStepPipelineMixin,
    check_prompts,
)
from .text_encoding import encode_prompt, repeat_embeddings


__all__ = ["OneStepPipeline", "OneStepPipelineOutput"]

logger = logging.get_logger(__name__)

DEFAULT_NASA_SCALE = 0.1  # SNOOPI's SD1.5 value
_STUDENT_FLAGS = ("t_init", "input_type")

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> import diffusers_onestep
        >>> from diffusers_onestep import OneStepPipeline

        >>> pipe = OneStepPipeline.from_pretrained("your-name/sd15-pgsb-student", dtype=torch.bfloat16)
        >>> image = pipe("a photo of a pet", negative_prompt="cat", nasa_scale=0.1).images[0]

        >>> # or: a teacher checkpoint plus distilled LoRA weights
        >>> pipe = OneStepPipeline.from_teacher("stable-diffusion-v1-5/stable-diffusion-v1-5", lora="your-name/sd15-pgsb-lora")
        ```
"""


@dataclass
class OneStepPipelineOutput(BaseOutput):
    r"""
    Output of `OneStepPipeline`.

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`):
            The generated images (or latents with `output_type="latent"`).
        nfe (`int`):
            Network (UNet) evaluations spent per image: one per scheduler timestep, doubled under output-space CFG.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    nfe: int


class OneStepPipeline(
    OneStepLoadingMixin,
    OneStepPipelineMixin,
    DiffusionPipeline,
    StableDiffusionMixin,
    StableDiffusionLoraLoaderMixin,
    TextualInversionLoaderMixin,
):
    r"""
    Text-to-image with a one-step (or few-step) student: the UNet runs once per step at the scheduler's conditioning
    timestep and the scheduler turns its output into the clean sample (re-noising between steps).

    A negative prompt is honoured through NASA (`NASAAttnProcessor`, SNOOPI Eq. 7): the negative text is subtracted
    inside every cross-attention layer, at the cost of one extra attention per layer. Output-space classifier-free
    guidance (`guidance_scale > 1`) is available as an explicit opt-in only: it doubles the UNet work and, on one-step
    students, lowers quality (SNOOPI reports HPSv2 -0.33 at scale 1.5 and -3.61 at 2.5).

    Any scheduler of `ConsistencyStudentScheduler.compatibles` can be swapped in (`from_config`), as in diffusers;
    `enable_freeu`, `fuse_qkv_projections`, VAE slicing / tiling (`pipe.vae.enable_slicing()`), CPU offload, LoRA and
    textual inversion work as in `StableDiffusionPipeline`.

    Args:
        vae (`AutoencoderKL`): decodes latents to images.
        text_encoder (`CLIPTextModel`, *optional*): the frozen text encoder; may be `None` when every call passes
            `prompt_embeds` (encode once, free the encoder).
        tokenizer (`CLIPTokenizer`, *optional*): its tokenizer.
        unet (`UNet2DConditionModel`): the distilled student.
        scheduler (`ConsistencyStudentScheduler`): holds the student's conditioning timestep and input convention.
        nasa_scale (`float`, defaults to 0.1): default NASA `alpha` for calls with a negative prompt (stored in the
            pipeline config; 0.1 suits SD1.5-like students, 0.2 SD2.1-like ones).
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["text_encoder", "tokenizer"]
    _exclude_from_cpu_offload = []
    _callback_tensor_inputs = ["latents", "denoised", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel | None,
        tokenizer: CLIPTokenizer | None,
        unet: UNet2DConditionModel,
        scheduler: ConsistencyStudentScheduler,
        nasa_scale: float = DEFAULT_NASA_SCALE,
    ):
        super().__init__()
        check_nasa_scale(nasa_scale)
        if text_encoder is not None:
            cross_dim, text_dim = unet.config.cross_attention_dim, text_encoder.config.hidden_size
            if cross_dim != text_dim:
                raise ValueError(
                    f"`unet` has cross_attention_dim={cross_dim} but `text_encoder` has hidden_size={text_dim}: "
                    "they must be equal (use the student trained on this text encoder)."
                )
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        self.register_to_config(nasa_scale=nasa_scale)
        self._init_image_processor()

    # ---------------------------------------------------------------- building and saving

    @classmethod
    def from_teacher(
        cls,
        teacher: DiffusionPipeline | str | os.PathLike,
        *,
        unet: UNet2DConditionModel | str | os.PathLike | None = None,
        lora: str | os.PathLike | dict | None = None,
        t_init: int | None = None,
        input_type: str | None = None,
        nasa_scale: float | None = None,
        dtype: torch.dtype | None = None,
        **scheduler_kwargs,
    ) -> OneStepPipeline:
        r"""
        Builds a one-step pipeline from a teacher's components plus a distilled student, in one line.

        **The student's saved config wins.** A student saved by our training scripts carries its scheduler config
        (`t_init`, `input_type`, ...) and, for a full pipeline, its `nasa_scale`; they are used unless given here
        explicitly. Without a saved config, the defaults are `t_init=999`, `input_type="noise"`, `nasa_scale=0.1`.

        **The teacher stays the teacher.** With a teacher pipeline object, its VAE, text encoder and tokenizer are
        shared (not copied). A `lora` is loaded into a weight-sharing copy of the teacher's UNet and text encoder
        (`share_weights_copy`: new module objects around the same weight tensors), so the teacher pipeline's outputs do
        not change: the memory cost is the LoRA weights and the module objects, no second copy of the base weights.
        `fuse_lora` on such a student first gives the adapted layers their own weights (then those layers cost their
        size once more).

        Args:
            teacher (`DiffusionPipeline`, `str` or `os.PathLike`):
                A Stable-Diffusion-like pipeline object, or a checkpoint directory / Hub id (loaded with
                `DiffusionPipeline.from_pretrained(..., use_safetensors=True)`; its UNet is not loaded when `unet` is
                given).
            unet (`UNet2DConditionModel`, `str` or `os.PathLike`, *optional*):
                The full student: a model, or a directory / Hub id holding a diffusers UNet (a whole student pipeline
                directory with a `unet/` folder works too, and then its scheduler config and `nasa_scale` are used).
                Defaults to the teacher's UNet.
            lora (`str`, `os.PathLike` or `dict`, *optional*):
                Student LoRA weights for `load_lora_weights` (a LoRA student directory's `scheduler/` config is used).
            t_init (`int`, *optional*): the student's conditioning timestep (999 SwiftBrush, 625 SiD-LSG).
            input_type (`str`, *optional*): `"noise"` or `"scaled_noise"` (see the scheduler).
            nasa_scale (`float`, *optional*): the default NASA scale stored in the config.
            dtype (`torch.dtype`, *optional*): dtype for the loaded modules (diffusers 0.42's name for `torch_dtype`).
            scheduler_kwargs: other `ConsistencyStudentScheduler` config overrides.

        Example:

        ```py
        >>> pipe = OneStepPipeline.from_teacher("path/to/sd15", unet="path/to/student")
        ```
        """
        return cls._from_teacher(
            teacher, network=unet, lora=lora, t_init=t_init, input_type=input_type, nasa_scale=nasa_scale, dtype=dtype,
            **scheduler_kwargs,
        )  # fmt: skip

    def fuse_lora(self, components: list[str] | None = None, **kwargs):
        r"""
        `StableDiffusionLoraLoaderMixin.fuse_lora`; on a student built by `from_teacher(teacher_pipe, lora=...)`, the
        adapted layers first get their own copy of the base weights, so fusing never changes the teacher.
        """
        components = ["unet", "text_encoder"] if components is None else components
        self._unshare_before_fusing(components)
        return super().fuse_lora(components=components, **kwargs)

    # ---------------------------------------------------------------- prompts and checks

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device,
        num_images_per_prompt: int = 1,
        prompt_embeds: torch.Tensor | None = None,
        lora_scale: float | None = None,
        clip_skip: int | None = None,
    ) -> torch.Tensor:
        r"""
        Encodes one branch of prompts (positive, negative or empty) with `text_encoding.encode_prompt`, applying the
        text-encoder LoRA scale and textual-inversion tokens as `StableDiffusionPipeline` does. Returns
        `(batch * num_images_per_prompt, tokens, dim)`. Works without a text encoder when `prompt_embeds` is given.
        """
        if prompt_embeds is not None:
            dtype = self.text_encoder.dtype if self.text_encoder is not None else self.unet.dtype
            return repeat_embeddings(prompt_embeds.to(device=device, dtype=dtype), num_images_per_prompt)
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError(
                "This pipeline has no `text_encoder` / `tokenizer`: pass `prompt_embeds` (and "
                "`negative_prompt_embeds`) instead of text."
            )
        prompt = self.maybe_convert_prompt(prompt, self.tokenizer)
        scaled = lora_scale is not None and USE_PEFT_BACKEND
        if scaled:
            scale_lora_layers(self.text_encoder, lora_scale)
        try:
            return encode_prompt(self.tokenizer, self.text_encoder, prompt, device, num_images_per_prompt, clip_skip)
        finally:
            if scaled:
                unscale_lora_layers(self.text_encoder, lora_scale)

    def check_inputs(
        self,
        *,
        prompt,
        negative_prompt,
        nasa_scale,
        nasa_scale_given: bool,
        guidance_scale,
        num_inference_steps,
        timesteps,
        height,
        width,
        num_images_per_prompt,
        generator,
        latents,
        prompt_embeds,
        negative_prompt_embeds,
        output_type,
        callback_on_step_end,
        callback_on_step_end_tensor_inputs,
    ) -> int:
        r"""Validates every argument before any work; returns the prompt batch size."""
        batch_size = check_prompts(
            prompt=prompt, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, embed_dim=self.unet.config.cross_attention_dim,
        )  # fmt: skip
        if self.text_encoder is None and (prompt is not None or negative_prompt is not None):
            raise ValueError(
                "This pipeline has no `text_encoder`: pass `prompt_embeds` / `negative_prompt_embeds` instead of text."
            )
        self.check_generation_inputs(
            batch_size=batch_size, nasa_scale=nasa_scale, nasa_scale_given=nasa_scale_given,
            guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, timesteps=timesteps, height=height,
            width=width, num_images_per_prompt=num_images_per_prompt, generator=generator, latents=latents,
            output_type=output_type, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )  # fmt: skip
        return batch_size

    def _prompt_embeddings(
        self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, batch_size, needs_negative, device,
        lora_scale, clip_skip,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """Positive and (when needed) negative embeddings, in one text-encoder call when both are text."""
        if needs_negative and negative_prompt_embeds is None:
            negative_prompt = "" if negative_prompt is None else negative_prompt
            negative_prompt = [negative_prompt] * batch_size if isinstance(negative_prompt, str) else negative_prompt
        if prompt_embeds is None and needs_negative and negative_prompt_embeds is None:
            prompt = [prompt] if isinstance(prompt, str) else prompt
            both = self.encode_prompt(prompt + negative_prompt, device, 1, None, lora_scale, clip_skip)
            return both.split(batch_size)
        prompt_embeds = self.encode_prompt(prompt, device, 1, prompt_embeds, lora_scale, clip_skip)
        if not needs_negative:
            return prompt_embeds, None
        if negative_prompt_embeds is not None and negative_prompt_embeds.shape[0] == 1:
            negative_prompt_embeds = negative_prompt_embeds.expand(batch_size, -1, -1)
        negative_prompt_embeds = self.encode_prompt(
            negative_prompt, device, 1, negative_prompt_embeds, lora_scale, clip_skip
        )
        return prompt_embeds, negative_prompt_embeds

    # ---------------------------------------------------------------- generation

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        nasa_scale: float | None = None,
        num_inference_steps: int = 1,
        timesteps: list[int] | None = None,
        guidance_scale: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> OneStepPipelineOutput | tuple:
        r"""
        Generates images in `num_inference_steps` student evaluations (one by default).

        Args:
            prompt (`str` or `list[str]`): what to generate (or pass `prompt_embeds`).
            negative_prompt (`str` or `list[str]`, *optional*): what to steer away from, through NASA; one string
                for all prompts or one per prompt.
            nasa_scale (`float`, *optional*): NASA `alpha` in [0, 1.5] in practice; defaults to the config's value.
            num_inference_steps (`int`, defaults to 1): student steps; more than one re-noises the prediction at
                `floor(t_init (1 - i / K))` (with another scheduler: that scheduler's own schedule).
            timesteps (`list[int]`, *optional*): custom strictly descending timesteps (overrides
                `num_inference_steps`), for schedulers whose `set_timesteps` accepts them.
            guidance_scale (`float`, defaults to 1.0): output-space CFG runs only above 1 (0 and 1 mean none, as in
                diffusers' Turbo / LCM pipelines); the negative prompt is then the unconditional branch and NASA is
                off. Costs a second UNet evaluation per step.
            height, width (`int`, *optional*): image size; defaults to the UNet's sample size times the VAE factor.
            num_images_per_prompt (`int`, defaults to 1): images per prompt.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): one, or one per image.
            latents (`torch.Tensor`, *optional*): the initial noise `z`, `(batch, C, h, w)`, finite; moved to the
                execution device and the embeddings' dtype.
            prompt_embeds, negative_prompt_embeds (`torch.Tensor`, *optional*): precomputed text features.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"`, `"pt"` or `"latent"`.
            return_dict (`bool`, defaults to True): return a `OneStepPipelineOutput` instead of a tuple.
            cross_attention_kwargs (`dict`, *optional*): passed to the attention processors (`scale` sets LoRA scale).
            clip_skip (`int`, *optional*): CLIP layers to skip.
            callback_on_step_end (`Callable` or `PipelineCallback`, *optional*): `callback(pipe, step, timestep,
                callback_kwargs) -> dict` after every step; the returned tensors replace the pipeline's. diffusers'
                built-in callbacks (`SDCFGCutoffCallback`, ...) work: under CFG `prompt_embeds` is
                `cat([negative, positive])` as in `StableDiffusionPipeline`.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*): tensors handed to the callback, from
                `_callback_tensor_inputs`; defaults to `["latents"]`.

        Returns:
            `OneStepPipelineOutput` (or `(images, nfe)` with `return_dict=False`).
        """
        tensor_inputs = self.callback_tensor_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        nasa_scale, negatives = self.apply_context_guidance(
            nasa_scale, negative_prompt=negative_prompt, negative_prompt_embeds=negative_prompt_embeds
        )
        negative_prompt, negative_prompt_embeds = negatives.values()
        nasa_scale_given = nasa_scale is not None
        nasa_scale = self.config.nasa_scale if nasa_scale is None else nasa_scale

        # 1. Check inputs (raises before any work)
        batch_size = self.check_inputs(
            prompt=prompt, negative_prompt=negative_prompt, nasa_scale=nasa_scale, nasa_scale_given=nasa_scale_given,
            guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, timesteps=timesteps,
            height=height, width=width, num_images_per_prompt=num_images_per_prompt, generator=generator,
            latents=latents, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            output_type=output_type, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=tensor_inputs,
        )  # fmt: skip
        height, width = self.begin_call(height, width, guidance_scale, cross_attention_kwargs, clip_skip)
        device = self._execution_device
        lora_scale = (cross_attention_kwargs or {}).get("scale")

        # 2. Encode the prompts: positive, negative (for NASA or CFG) or empty (CFG without a negative)
        has_negative = negative_prompt is not None or negative_prompt_embeds is not None
        needs_negative = has_negative or self.do_classifier_free_guidance
        prompt_embeds, negative_prompt_embeds = self._prompt_embeddings(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, batch_size, needs_negative, device,
            lora_scale, clip_skip,
        )  # fmt: skip
        prompt_embeds = repeat_embeddings(prompt_embeds, num_images_per_prompt)
        if needs_negative:
            negative_prompt_embeds = repeat_embeddings(negative_prompt_embeds, num_images_per_prompt)

        # 3.-6. Timesteps, initial noise z, the student steps (CFG / NASA / callbacks), decode
        negative = None if negative_prompt_embeds is None else {"encoder_hidden_states": negative_prompt_embeds}
        image, nfe = self.generate(
            total=batch_size * num_images_per_prompt, height=height, width=width, dtype=prompt_embeds.dtype,
            device=device, num_inference_steps=num_inference_steps, timesteps=timesteps, generator=generator,
            latents=latents, cond={"encoder_hidden_states": prompt_embeds}, negative=negative,
            nasa_scale=nasa_scale if has_negative else 0, cross_attention_kwargs=cross_attention_kwargs,
            callback_on_step_end=callback_on_step_end, tensor_inputs=tensor_inputs, output_type=output_type,
        )  # fmt: skip

        if not return_dict:
            return (image, nfe)
        return OneStepPipelineOutput(images=image, nfe=nfe)

