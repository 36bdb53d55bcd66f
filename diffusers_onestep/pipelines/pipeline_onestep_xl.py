"""`OneStepXLPipeline`: one- and few-step text-to-image from an SDXL-class student (SDXL-Turbo / DMD2 / LCM style)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.loaders import StableDiffusionXLLoraLoaderMixin, TextualInversionLoaderMixin
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..attention.nasa import check_nasa_scale
from ..models.backbones import BACKBONES
from ..schedulers.scheduling_consistency_student import ConsistencyStudentScheduler
from .loading import OneStepLoadingMixin
from .pipeline_onestep import OneStepPipelineOutput
from .pipeline_utils import OneStepPipelineMixin, check_prompts


__all__ = ["OneStepXLPipeline"]

# SNOOPI gives no SDXL value. Measured on the SDXL-shaped digits student (examples/digits/README.md, "An SDXL-shaped
# digits world"): every alpha in 0.1-0.3 raises the removal rate and lowers the FID of the other digits, 0.2 gives the
# lowest FID (177.2 against 189.5 without a negative, removal 0.926 against 0.888), 0.5 already costs FID. 0.2 is
# also SNOOPI's SD2.1 value. Not measured on real SDXL weights (none can be downloaded here).
SDXL_NASA_SCALE = 0.2


class OneStepXLPipeline(
    OneStepLoadingMixin,
    OneStepPipelineMixin,
    DiffusionPipeline,
    StableDiffusionMixin,
    StableDiffusionXLLoraLoaderMixin,
    TextualInversionLoaderMixin,
):
    r"""
    One- and few-step text-to-image with an SDXL student UNet. The same call as `OneStepPipeline` (NASA negatives,
    steps / timesteps, callbacks, output types) plus what `StableDiffusionXLPipeline` takes: `prompt_2`,
    `negative_prompt_2`, pooled embeddings and the size conditions (`original_size`, `crops_coords_top_left`,
    `target_size` and their `negative_` twins, used by the unconditional branch of output-space CFG).

    Prompts are encoded by `StableDiffusionXLPipeline.encode_prompt` itself (both CLIP encoders, LoRA scale, textual
    inversion, clip_skip) and the size conditions by its `_get_add_time_ids`: nothing of SDXL's encoding is copied.
    NASA changes only the cross-attention text; the pooled embeddings and time ids stay those of the positive prompt.

    Args:
        vae (`AutoencoderKL`), text_encoder (`CLIPTextModel`), text_encoder_2 (`CLIPTextModelWithProjection`),
        tokenizer, tokenizer_2 (`CLIPTokenizer`): SDXL's; the encoders and tokenizers may be `None` when every call
            passes embeddings.
        unet (`UNet2DConditionModel`): the student (`addition_embed_type="text_time"`).
        scheduler (`ConsistencyStudentScheduler`): the student's conditioning timestep and input convention.
        nasa_scale (`float`, defaults to 0.2): default NASA `alpha` (see `SDXL_NASA_SCALE`: not measured on SDXL).
        force_zeros_for_empty_prompt (`bool`, defaults to True): as in `StableDiffusionXLPipeline` (CFG's empty
            negative is zeros).
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->vae"
    _optional_components = ["tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"]
    _callback_tensor_inputs = [
        "latents", "denoised", "prompt_embeds", "negative_prompt_embeds", "add_text_embeds", "add_time_ids",
    ]  # fmt: skip
    _callback_conditioning = {
        "prompt_embeds": "encoder_hidden_states", "add_text_embeds": "text_embeds", "add_time_ids": "time_ids",
    }  # fmt: skip
    backbone = BACKBONES["sdxl"]
    _teacher_components = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    _text_encoders = ("text_encoder", "text_encoder_2")
    default_nasa_scale = SDXL_NASA_SCALE

    # SDXL's own prompt and size-condition encoding, reused (they read only the attributes this class also has)
    encode_prompt = StableDiffusionXLPipeline.encode_prompt
    _get_add_time_ids = StableDiffusionXLPipeline._get_add_time_ids

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel | None,
        text_encoder_2: CLIPTextModelWithProjection | None,
        tokenizer: CLIPTokenizer | None,
        tokenizer_2: CLIPTokenizer | None,
        unet: UNet2DConditionModel,
        scheduler: ConsistencyStudentScheduler,
        nasa_scale: float = SDXL_NASA_SCALE,
        force_zeros_for_empty_prompt: bool = True,
    ):
        super().__init__()
        check_nasa_scale(nasa_scale)
        if unet.config.get("addition_embed_type") != "text_time":
            raise ValueError(
                "`unet` is not an SDXL UNet (its `addition_embed_type` is "
                f"{unet.config.get('addition_embed_type')!r}, not 'text_time'): use `OneStepPipeline` for SD 1.x / 2.x."
            )
        widths = [e.config.hidden_size for e in (text_encoder, text_encoder_2) if e is not None]
        if len(widths) == 2 and sum(widths) != unet.config.cross_attention_dim:
            raise ValueError(
                f"`unet` has cross_attention_dim={unet.config.cross_attention_dim} but the two text encoders give "
                f"{widths[0]} + {widths[1]} = {sum(widths)}: use the student trained on these encoders."
            )
        self.register_modules(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
        )  # fmt: skip
        self.register_to_config(nasa_scale=nasa_scale, force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
        self._init_image_processor()

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
    ) -> OneStepXLPipeline:
        r"""
        Builds the student from an SDXL teacher (`StableDiffusionXLPipeline` object, directory or Hub id) plus a full
        student UNet or LoRA weights, with the rules of `OneStepPipeline.from_teacher`: the student's saved config
        wins unless overridden here, and the teacher's own modules never receive the adapter.
        """
        return cls._from_teacher(
            teacher, network=unet, lora=lora, t_init=t_init, input_type=input_type, nasa_scale=nasa_scale, dtype=dtype,
            **scheduler_kwargs,
        )  # fmt: skip

    def fuse_lora(self, components: list[str] | None = None, **kwargs):
        r"""`StableDiffusionXLLoraLoaderMixin.fuse_lora`, never writing into a teacher's shared weights."""
        components = ["unet", "text_encoder", "text_encoder_2"] if components is None else components
        self._unshare_before_fusing(components)
        return super().fuse_lora(components=components, **kwargs)

    def _time_ids(self, original_size, crops_coords_top_left, target_size, dtype, pooled, total, device):
        projection_dim = (
            self.text_encoder_2.config.projection_dim if self.text_encoder_2 is not None else int(pooled.shape[-1])
        )
        time_ids = self._get_add_time_ids(
            original_size, crops_coords_top_left, target_size, dtype=dtype, text_encoder_projection_dim=projection_dim
        )
        return time_ids.to(device).repeat(total, 1)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
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
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> OneStepPipelineOutput | tuple:
        r"""
        Generates images in `num_inference_steps` student evaluations (one by default). Arguments as in
        `OneStepPipeline.__call__` and `StableDiffusionXLPipeline.__call__`; `pooled_prompt_embeds` is required with
        `prompt_embeds` (and `negative_pooled_prompt_embeds` with `negative_prompt_embeds`), as in SDXL.

        Returns:
            `OneStepPipelineOutput` (or `(images, nfe)` with `return_dict=False`).
        """
        tensor_inputs = self.callback_tensor_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        nasa_scale, negatives = self.apply_context_guidance(
            nasa_scale, negative_prompt=negative_prompt, negative_prompt_embeds=negative_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
        )  # fmt: skip
        negative_prompt, negative_prompt_embeds, negative_pooled_prompt_embeds = negatives.values()
        nasa_scale_given = nasa_scale is not None
        nasa_scale = self.config.nasa_scale if nasa_scale is None else nasa_scale

        # 1. Check inputs (raises before any work)
        batch_size = check_prompts(
            prompt=prompt, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, embed_dim=self.unet.config.cross_attention_dim,
        )  # fmt: skip
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError("`pooled_prompt_embeds` is required with `prompt_embeds` (from the same text encoder 2).")
        if negative_prompt_embeds is not None and negative_pooled_prompt_embeds is None:
            raise ValueError("`negative_pooled_prompt_embeds` is required with `negative_prompt_embeds`.")
        if self.text_encoder_2 is None and (prompt is not None or negative_prompt is not None):
            raise ValueError("This pipeline has no text encoders: pass the embeddings instead of text.")
        self.check_generation_inputs(
            batch_size=batch_size, nasa_scale=nasa_scale, nasa_scale_given=nasa_scale_given,
            guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, timesteps=timesteps, height=height,
            width=width, num_images_per_prompt=num_images_per_prompt, generator=generator, latents=latents,
            output_type=output_type, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=tensor_inputs,
        )  # fmt: skip
        height, width = self.begin_call(height, width, guidance_scale, cross_attention_kwargs, clip_skip)
        device = self._execution_device
        total = batch_size * num_images_per_prompt

        # 2. Encode the prompts with SDXL's own encode_prompt (the negative branch only when NASA or CFG needs it)
        has_negative = negative_prompt is not None or negative_prompt_embeds is not None
        needs_negative = has_negative or self.do_classifier_free_guidance
        if isinstance(negative_prompt, str) and not isinstance(prompt, str) and prompt is not None:
            negative_prompt = [negative_prompt] * batch_size
        prompt_embeds, negative_prompt_embeds, pooled, negative_pooled = self.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, device=device, num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=needs_negative, negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            lora_scale=(cross_attention_kwargs or {}).get("scale"), clip_skip=clip_skip,
        )  # fmt: skip
        original_size = original_size or (height, width)
        target_size = target_size or (height, width)
        cond = {
            "encoder_hidden_states": prompt_embeds, "text_embeds": pooled,
            "time_ids": self._time_ids(original_size, crops_coords_top_left, target_size, prompt_embeds.dtype, pooled,
                                       total, device),
        }  # fmt: skip
        negative = None
        if needs_negative:
            negative = {
                "encoder_hidden_states": negative_prompt_embeds, "text_embeds": negative_pooled,
                "time_ids": self._time_ids(negative_original_size or original_size, negative_crops_coords_top_left,
                                           negative_target_size or target_size, prompt_embeds.dtype, pooled, total,
                                           device),
            }  # fmt: skip

        # 3.-6. Timesteps, initial noise z, the student steps (CFG / NASA / callbacks), decode
        image, nfe = self.generate(
            total=total, height=height, width=width, dtype=prompt_embeds.dtype, device=device,
            num_inference_steps=num_inference_steps, timesteps=timesteps, generator=generator, latents=latents,
            cond=cond, negative=negative, nasa_scale=nasa_scale if has_negative else 0,
            cross_attention_kwargs=cross_attention_kwargs, callback_on_step_end=callback_on_step_end,
            tensor_inputs=tensor_inputs, output_type=output_type,
        )  # fmt: skip
        if not return_dict:
            return (image, nfe)
        return OneStepPipelineOutput(images=image, nfe=nfe)
