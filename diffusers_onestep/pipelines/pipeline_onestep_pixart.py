"""`OneStepPixArtPipeline`: one- and few-step text-to-image from a PixArt-α / Σ (DiT, T5) student transformer."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, PixArtAlphaPipeline, PixArtTransformer2DModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PixArtImageProcessor
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
    ASPECT_RATIO_256_BIN,
    ASPECT_RATIO_512_BIN,
    ASPECT_RATIO_1024_BIN,
)
from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import T5EncoderModel, T5Tokenizer

from ..attention.nasa import check_nasa_scale
from ..models.backbones import BACKBONES
from ..schedulers.scheduling_consistency_student import ConsistencyStudentScheduler
from .loading import OneStepLoadingMixin
from .pipeline_onestep import OneStepPipelineOutput
from .pipeline_utils import OneStepPipelineMixin, check_prompts


__all__ = ["OneStepPixArtPipeline"]

PIXART_NASA_SCALE = 0.5  # SNOOPI's PixArt-α value
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# PixArt's resolution bins, by the transformer's latent sample size (as PixArtAlphaPipeline / PixArtSigmaPipeline)
_BINS = {32: ASPECT_RATIO_256_BIN, 64: ASPECT_RATIO_512_BIN, 128: ASPECT_RATIO_1024_BIN, 256: ASPECT_RATIO_2048_BIN}


class OneStepPixArtPipeline(OneStepLoadingMixin, OneStepPipelineMixin, DiffusionPipeline):
    r"""
    One- and few-step text-to-image with a PixArt-α / Σ student transformer (SNOOPI's DiT setting). The same call as
    `OneStepPipeline` (NASA negatives, steps / timesteps, callbacks, output types) plus what `PixArtAlphaPipeline`
    takes: `prompt_attention_mask` / `negative_prompt_attention_mask`, `max_sequence_length`, `clean_caption` and
    resolution binning.

    Prompts are encoded by `PixArtAlphaPipeline.encode_prompt` itself (T5 with its attention mask). NASA reaches the
    transformer's cross-attention with the negative passed through the same caption projection as the positive one,
    and its own attention mask. A LoRA student is a PEFT adapter on the transformer (`transformer.load_lora_adapter`;
    `from_teacher(..., lora=...)` does it).

    Args:
        tokenizer (`T5Tokenizer`), text_encoder (`T5EncoderModel`): PixArt's (may be `None` with embeddings given).
        vae (`AutoencoderKL`): the VAE.
        transformer (`PixArtTransformer2DModel`): the student (a learned-sigma output's second half is dropped).
        scheduler (`ConsistencyStudentScheduler`): the student's conditioning timestep and input convention.
        nasa_scale (`float`, defaults to 0.5): default NASA `alpha` (SNOOPI's PixArt-α value).
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["tokenizer", "text_encoder"]
    _callback_tensor_inputs = ["latents", "denoised", "prompt_embeds", "negative_prompt_embeds"]
    backbone = BACKBONES["pixart"]
    _network_class_name = "PixArtTransformer2DModel"
    default_nasa_scale = PIXART_NASA_SCALE

    # PixArt's own prompt encoding, reused with the caption cleaning it calls
    encode_prompt = PixArtAlphaPipeline.encode_prompt
    _text_preprocessing = PixArtAlphaPipeline._text_preprocessing
    _clean_caption = PixArtAlphaPipeline._clean_caption
    bad_punct_regex = PixArtAlphaPipeline.bad_punct_regex

    def __init__(
        self,
        tokenizer: T5Tokenizer | None,
        text_encoder: T5EncoderModel | None,
        vae: AutoencoderKL,
        transformer: PixArtTransformer2DModel,
        scheduler: ConsistencyStudentScheduler,
        nasa_scale: float = PIXART_NASA_SCALE,
    ):
        super().__init__()
        check_nasa_scale(nasa_scale)
        if text_encoder is not None and text_encoder.config.d_model != transformer.config.caption_channels:
            raise ValueError(
                f"`transformer` has caption_channels={transformer.config.caption_channels} but `text_encoder` has "
                f"d_model={text_encoder.config.d_model}: use the student trained on this text encoder."
            )
        self.register_modules(
            tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
        )
        self.register_to_config(nasa_scale=nasa_scale)
        self._init_image_processor()
        self.image_processor = PixArtImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @classmethod
    def from_teacher(
        cls,
        teacher: DiffusionPipeline | str | os.PathLike,
        *,
        transformer: PixArtTransformer2DModel | str | os.PathLike | None = None,
        lora: str | os.PathLike | dict | None = None,
        t_init: int | None = None,
        input_type: str | None = None,
        nasa_scale: float | None = None,
        dtype: torch.dtype | None = None,
        **scheduler_kwargs,
    ) -> OneStepPixArtPipeline:
        r"""
        Builds the student from a PixArt-α / Σ teacher (pipeline object, directory or Hub id) plus a full student
        transformer or LoRA weights, with the rules of `OneStepPipeline.from_teacher`.
        """
        return cls._from_teacher(
            teacher, network=transformer, lora=lora, t_init=t_init, input_type=input_type, nasa_scale=nasa_scale,
            dtype=dtype, **scheduler_kwargs,
        )  # fmt: skip

    # ---------------------------------------------------------------- LoRA (PEFT on the transformer)
    # diffusers 0.42's PixArtTransformer2DModel has no PEFT mixin (no `add_adapter` / `load_lora_adapter`), so the
    # adapter is injected with peft's public API; the file is `pytorch_lora_weights.safetensors` with the LoraConfig
    # in its metadata.

    def load_lora_weights(
        self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None, lora_config=None, **kwargs
    ):
        r"""
        Loads a transformer LoRA written by `save_lora_weights` (a directory, a file, or a state dict with
        `lora_config=`): `peft.inject_adapter_in_model` + `set_peft_model_state_dict`, safetensors only.
        """
        from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

        source = pretrained_model_name_or_path_or_dict
        if isinstance(source, dict):
            if lora_config is None:
                raise ValueError("`lora_config` (a peft `LoraConfig`) is required with a state dict.")
            state = source
        else:
            path = os.path.join(source, LORA_WEIGHT_NAME) if os.path.isdir(source) else str(source)
            if not path.endswith(".safetensors") or not os.path.isfile(path):
                raise ValueError(f"`pretrained_model_name_or_path_or_dict`: no {LORA_WEIGHT_NAME} at {source!r}.")
            with safe_open(path, framework="pt") as file:
                metadata = file.metadata() or {}
            if lora_config is None and "lora_config" not in metadata:
                raise ValueError(f"{path!r} has no `lora_config` metadata: pass `lora_config=`.")
            lora_config = lora_config or LoraConfig(**json.loads(metadata["lora_config"]))
            state = load_file(path)
        adapter_name = adapter_name or f"default_{len(self.get_list_adapters())}"
        inject_adapter_in_model(lora_config, self.transformer, adapter_name=adapter_name)
        result = set_peft_model_state_dict(self.transformer, state, adapter_name=adapter_name)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"The LoRA weights hold keys this transformer does not have: {unexpected[:5]}.")

    def get_list_adapters(self) -> list[str]:
        r"""The names of the LoRA adapters on the transformer."""
        names = {name for layer in self.transformer.modules() if isinstance(layer, BaseTunerLayer)
                 for name in layer.lora_A}  # fmt: skip
        return sorted(names)

    def save_lora_weights(self, save_directory: str | os.PathLike, adapter_name: str | None = None):
        r"""Saves one transformer LoRA adapter (the only one by default) and its `LoraConfig`, in safetensors."""
        from peft import get_peft_model_state_dict

        adapters = self.get_list_adapters()
        if adapter_name is None and len(adapters) != 1:
            raise ValueError(f"`adapter_name`: the transformer has adapters {adapters}; name the one to save.")
        adapter_name = adapter_name or adapters[0]
        config = self.transformer.peft_config[adapter_name]
        state = get_peft_model_state_dict(self.transformer, adapter_name=adapter_name)
        os.makedirs(save_directory, exist_ok=True)
        metadata = {"lora_config": json.dumps(config.to_dict(), default=list)}
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(save_directory, LORA_WEIGHT_NAME),
                  metadata=metadata)  # fmt: skip

    def unload_lora_weights(self):
        r"""Removes every LoRA layer from the transformer (fused weights stay fused)."""
        from diffusers.utils import recurse_remove_peft_layers

        recurse_remove_peft_layers(self.transformer)
        if hasattr(self.transformer, "peft_config"):
            del self.transformer.peft_config

    def fuse_lora(self, adapter_names: list[str] | None = None):
        r"""Merges the adapters into the transformer's weights (a teacher's shared weights are copied first)."""
        self._unshare_before_fusing(["transformer"])
        for layer in self.transformer.modules():
            if isinstance(layer, BaseTunerLayer):
                layer.merge(adapter_names=adapter_names)

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
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        clean_caption: bool = False,
        use_resolution_binning: bool = True,
        max_sequence_length: int = 120,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> OneStepPipelineOutput | tuple:
        r"""
        Generates images in `num_inference_steps` student evaluations (one by default). Arguments as in
        `OneStepPipeline.__call__` and `PixArtAlphaPipeline.__call__`; `use_resolution_binning` maps the size to
        PixArt's nearest trained aspect-ratio bin and resizes the images back (only for transformers with a known
        bin table: latent sample size 32, 64, 128 or 256).

        Returns:
            `OneStepPipelineOutput` (or `(images, nfe)` with `return_dict=False`).
        """
        tensor_inputs = self.callback_tensor_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        nasa_scale, negatives = self.apply_context_guidance(
            nasa_scale, negative_prompt=negative_prompt, negative_prompt_embeds=negative_prompt_embeds,
            negative_prompt_attention_mask=negative_prompt_attention_mask,
        )  # fmt: skip
        negative_prompt, negative_prompt_embeds, negative_prompt_attention_mask = negatives.values()
        nasa_scale_given = nasa_scale is not None
        nasa_scale = self.config.nasa_scale if nasa_scale is None else nasa_scale

        # 1. Check inputs (raises before any work)
        batch_size = check_prompts(
            prompt=prompt, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, embed_dim=self.transformer.config.caption_channels,
        )  # fmt: skip
        if prompt_embeds is not None and prompt_attention_mask is None:
            raise ValueError("`prompt_attention_mask` is required with `prompt_embeds` (T5 pads its tokens).")
        if negative_prompt_embeds is not None and negative_prompt_attention_mask is None:
            raise ValueError("`negative_prompt_attention_mask` is required with `negative_prompt_embeds`.")
        if self.text_encoder is None and (prompt is not None or negative_prompt is not None):
            raise ValueError("This pipeline has no `text_encoder`: pass the embeddings instead of text.")
        if not isinstance(max_sequence_length, int) or max_sequence_length < 1:
            raise ValueError(f"`max_sequence_length` must be an integer >= 1, got {max_sequence_length}.")
        sample_size = self.transformer.config.sample_size
        if use_resolution_binning and sample_size not in _BINS:
            raise ValueError(
                f"`use_resolution_binning`: PixArt has bins for latent sample sizes {sorted(_BINS)}, this transformer "
                f"has {sample_size}; pass `use_resolution_binning=False`."
            )
        self.check_generation_inputs(
            batch_size=batch_size, nasa_scale=nasa_scale, nasa_scale_given=nasa_scale_given,
            guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, timesteps=timesteps, height=height,
            width=width, num_images_per_prompt=num_images_per_prompt, generator=generator, latents=latents,
            output_type=output_type, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=tensor_inputs,
        )  # fmt: skip
        height, width = self.begin_call(height, width, guidance_scale, cross_attention_kwargs)
        if use_resolution_binning:
            orig_height, orig_width = height, width
            height, width = self.image_processor.classify_height_width_bin(height, width, ratios=_BINS[sample_size])
        device = self._execution_device
        total = batch_size * num_images_per_prompt

        # 2. Encode the prompts with PixArt's own encode_prompt (the negative branch only when NASA or CFG needs it)
        has_negative = negative_prompt is not None or negative_prompt_embeds is not None
        needs_negative = has_negative or self.do_classifier_free_guidance
        prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask = (
            self.encode_prompt(
                prompt, do_classifier_free_guidance=needs_negative,
                negative_prompt="" if negative_prompt is None else negative_prompt,
                num_images_per_prompt=num_images_per_prompt, device=device, prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds, prompt_attention_mask=prompt_attention_mask,
                negative_prompt_attention_mask=negative_prompt_attention_mask, clean_caption=clean_caption,
                max_sequence_length=max_sequence_length,
            )
        )  # fmt: skip
        sizes = {"resolution": None, "aspect_ratio": None}
        if self.transformer.use_additional_conditions:
            sizes = {
                "resolution": torch.tensor([height, width], device=device, dtype=prompt_embeds.dtype).repeat(total, 1),
                "aspect_ratio": torch.tensor([height / width], device=device, dtype=prompt_embeds.dtype).repeat(total, 1),
            }  # fmt: skip
        cond = {"encoder_hidden_states": prompt_embeds, "encoder_attention_mask": prompt_attention_mask, **sizes}
        negative = None
        if needs_negative:
            negative = {"encoder_hidden_states": negative_prompt_embeds,
                        "encoder_attention_mask": negative_prompt_attention_mask, **sizes}  # fmt: skip

        # 3.-6. Timesteps, initial noise z, the student steps (CFG / NASA / callbacks), decode
        image, nfe = self.generate(
            total=total, height=height, width=width, dtype=prompt_embeds.dtype, device=device,
            num_inference_steps=num_inference_steps, timesteps=timesteps, generator=generator, latents=latents,
            cond=cond, negative=negative, nasa_scale=nasa_scale if has_negative else 0,
            cross_attention_kwargs=cross_attention_kwargs, callback_on_step_end=callback_on_step_end,
            tensor_inputs=tensor_inputs, output_type="pt" if use_resolution_binning and output_type != "latent" else
            output_type,
        )  # fmt: skip
        if use_resolution_binning and output_type != "latent":
            image = self.image_processor.resize_and_crop_tensor(image * 2 - 1, orig_width, orig_height)
            image = self.image_processor.postprocess(image, output_type=output_type)
        if not return_dict:
            return (image, nfe)
        return OneStepPipelineOutput(images=image, nfe=nfe)
