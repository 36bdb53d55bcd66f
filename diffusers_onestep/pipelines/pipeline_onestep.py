"""`OneStepPipeline`: text-to-image in one (or a few) network evaluations from a distilled student UNet."""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin
from diffusers.utils import USE_PEFT_BACKEND, BaseOutput, scale_lora_layers, unscale_lora_layers
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

from ..attention.nasa import check_nasa_scale, nasa_attention
from ..losses.denoiser import classifier_free_guidance
from ..schedulers.scheduling_consistency_student import ConsistencyStudentScheduler
from .loading import OneStepLoadingMixin
from .text_encoding import encode_prompt, repeat_embeddings


__all__ = ["OneStepPipeline", "OneStepPipelineOutput"]

OUTPUT_TYPES = ("pil", "np", "pt", "latent")

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
            Network (UNet) evaluations spent per image: the number of steps, doubled under output-space CFG.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    nfe: int


def _first_tensor(module: torch.nn.Module) -> torch.Tensor | None:
    """The first parameter or buffer of `module` (what `ModelMixin.device` returns, without its module walk)."""
    return next(itertools.chain(module.parameters(), module.buffers()), None)


class OneStepPipeline(
    OneStepLoadingMixin, DiffusionPipeline, StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin
):
    r"""
    Text-to-image with a one-step (or few-step) student: the UNet runs once per step at the scheduler's conditioning
    timestep and the scheduler turns its output into the clean sample (re-noising between steps).

    A negative prompt is honoured through NASA (`NASAAttnProcessor`, SNOOPI Eq. 7): the negative text is subtracted
    inside every cross-attention layer, at the cost of one extra attention per layer. Output-space classifier-free
    guidance (`guidance_scale > 1`) is available as an explicit opt-in only: it doubles the UNet work and, on one-step
    students, lowers quality (SNOOPI reports HPSv2 -0.33 at scale 1.5 and -3.61 at 2.5).

    Args:
        vae (`AutoencoderKL`): decodes latents to images.
        text_encoder (`CLIPTextModel`): the frozen text encoder.
        tokenizer (`CLIPTokenizer`): its tokenizer.
        unet (`UNet2DConditionModel`): the distilled student.
        scheduler (`ConsistencyStudentScheduler`): holds the student's conditioning timestep and input convention.
        nasa_scale (`float`, defaults to 0.1): default NASA `alpha` for calls with a negative prompt (stored in the
            pipeline config; 0.1 suits SD1.5-like students, 0.2 SD2.1-like ones).
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = []
    _exclude_from_cpu_offload = []
    _callback_tensor_inputs = ["latents", "denoised", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: ConsistencyStudentScheduler,
        nasa_scale: float = 0.1,
    ):
        super().__init__()
        check_nasa_scale(nasa_scale)
        cross_dim, text_dim = unet.config.cross_attention_dim, text_encoder.config.hidden_size
        if cross_dim != text_dim:
            raise ValueError(
                f"`unet` has cross_attention_dim={cross_dim} but `text_encoder` has hidden_size={text_dim}: "
                "they must be equal (use the student trained on this text encoder)."
            )
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        self.register_to_config(nasa_scale=nasa_scale)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @property
    def _execution_device(self) -> torch.device:
        r"""
        diffusers finds the execution device (and `ModelMixin.device` / `.dtype`) by walking every submodule for
        offload hooks: about 5 ms per call for a 6M-parameter UNet, several percent of a one-step call. Offloading
        always hooks the top-level module (accelerate's `_hf_hook`, diffusers' group-offloading `_diffusers_hook`), so
        without such a hook the device of the first parameter is the answer (an accelerator one first, like
        `DiffusionPipeline.device`).
        """
        components = [c for c in self.components.values() if isinstance(c, torch.nn.Module)]
        if any("_hf_hook" in c.__dict__ or "_diffusers_hook" in c.__dict__ for c in components):
            return super()._execution_device
        devices = [_first_tensor(c).device for c in components if _first_tensor(c) is not None]
        return next(
            (d for d in devices if d.type not in ("cpu", "meta")), devices[0] if devices else torch.device("cpu")
        )

    @classmethod
    def from_teacher(
        cls,
        teacher: DiffusionPipeline | str | os.PathLike,
        unet: UNet2DConditionModel | str | os.PathLike | None = None,
        lora: str | os.PathLike | dict | None = None,
        t_init: int = 999,
        input_type: str = "noise",
        nasa_scale: float = 0.1,
        dtype: torch.dtype | None = None,
        **scheduler_kwargs,
    ) -> OneStepPipeline:
        r"""
        Builds a one-step pipeline from a teacher's components plus a distilled student, in one line.

        Args:
            teacher (`DiffusionPipeline`, `str` or `os.PathLike`):
                A Stable-Diffusion-like pipeline object (its modules are shared, not copied) or a checkpoint
                directory / Hub id (only the VAE, text encoder, tokenizer, scheduler config and, without `unet`,
                the UNet are loaded).
            unet (`UNet2DConditionModel`, `str` or `os.PathLike`, *optional*):
                The full student: a model, or a directory / Hub id holding a diffusers UNet (a whole pipeline
                directory with a `unet/` folder works too). Defaults to the teacher's UNet.
            lora (`str`, `os.PathLike` or `dict`, *optional*):
                Student LoRA weights for `load_lora_weights`. Loaded into the UNet in place: with a teacher object,
                the teacher's UNet gets the adapter too.
            t_init (`int`, defaults to 999): the student's conditioning timestep (999 SwiftBrush, 625 SiD-LSG).
            input_type (`str`, defaults to `"noise"`): `"noise"` or `"scaled_noise"` (see the scheduler).
            nasa_scale (`float`, defaults to 0.1): the default NASA scale stored in the config.
            dtype (`torch.dtype`, *optional*): dtype for the loaded modules (diffusers 0.42's name for `torch_dtype`).
            scheduler_kwargs: other `ConsistencyStudentScheduler` config overrides.

        Example:

        ```py
        >>> pipe = OneStepPipeline.from_teacher("path/to/sd15", unet="path/to/student/unet")
        ```
        """
        if unet is None and lora is None:
            raise ValueError("Pass the student as `unet` (full weights) or `lora` (LoRA weights), or both.")
        load_kwargs = {"dtype": dtype, "use_safetensors": True} if dtype else {"use_safetensors": True}
        if isinstance(teacher, (str, os.PathLike)):
            path = str(teacher)
            parts = {
                "vae": AutoencoderKL.from_pretrained(path, subfolder="vae", **load_kwargs),
                "text_encoder": CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **load_kwargs),
                "tokenizer": CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
                "scheduler_config": ConsistencyStudentScheduler.load_config(path, subfolder="scheduler"),
            }
            if unet is None:
                unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **load_kwargs)
        else:
            parts = {name: getattr(teacher, name) for name in ("vae", "text_encoder", "tokenizer")}
            parts["scheduler_config"] = teacher.scheduler.config
            unet = teacher.unet if unet is None else unet
        if isinstance(unet, (str, os.PathLike)):
            subfolder = "unet" if os.path.isdir(os.path.join(unet, "unet")) else None
            unet = UNet2DConditionModel.from_pretrained(unet, subfolder=subfolder, **load_kwargs)
        scheduler = ConsistencyStudentScheduler.from_config(
            parts.pop("scheduler_config"), t_init=t_init, input_type=input_type, **scheduler_kwargs
        )
        pipe = cls(**parts, unet=unet, scheduler=scheduler, nasa_scale=nasa_scale)
        if lora is not None:
            pipe.load_lora_weights(lora, use_safetensors=True)
        return pipe

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device,
        num_images_per_prompt: int,
        prompt_embeds: torch.Tensor | None = None,
        lora_scale: float | None = None,
        clip_skip: int | None = None,
    ) -> torch.Tensor:
        r"""
        Encodes one branch of prompts (positive, negative or empty) with `text_encoding.encode_prompt`, applying the
        text-encoder LoRA scale and textual-inversion tokens as `StableDiffusionPipeline` does. Returns
        `(batch * num_images_per_prompt, tokens, dim)`.
        """
        if prompt_embeds is not None:
            dtype = self.text_encoder.dtype if self.text_encoder is not None else self.unet.dtype
            return repeat_embeddings(prompt_embeds.to(device=device, dtype=dtype), num_images_per_prompt)
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
        prompt,
        negative_prompt,
        nasa_scale,
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
        callback_on_step_end_tensor_inputs,
        nasa_scale_given,
    ) -> int:
        r"""Validates every argument before any work; returns the prompt batch size."""
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("Pass exactly one of `prompt` or `prompt_embeds` (got both or neither).")
        if prompt is not None and not (
            isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(p, str) for p in prompt))
        ):
            raise ValueError(f"`prompt` must be a `str` or a `list[str]`, got {type(prompt)}.")
        if prompt_embeds is not None and (prompt_embeds.ndim != 3 or prompt_embeds.shape[0] == 0):
            raise ValueError(f"`prompt_embeds` must be (batch, tokens, dim), got shape {tuple(prompt_embeds.shape)}.")
        batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        if batch_size == 0:
            raise ValueError("`prompt` must not be an empty list.")
        cross_dim = self.unet.config.cross_attention_dim
        for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if embeds is not None and embeds.shape[-1] != cross_dim:
                raise ValueError(f"`{name}` has last dimension {embeds.shape[-1]}; the UNet expects {cross_dim}.")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass at most one of `negative_prompt` or `negative_prompt_embeds` (got both).")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            if not isinstance(negative_prompt, list) or not all(isinstance(p, str) for p in negative_prompt):
                raise ValueError(f"`negative_prompt` must be a `str` or a `list[str]`, got {type(negative_prompt)}.")
            if len(negative_prompt) != batch_size:
                raise ValueError(
                    f"`negative_prompt` has batch size {len(negative_prompt)} but `prompt` has {batch_size}: pass one "
                    "string for all prompts or one negative per prompt."
                )
        if negative_prompt_embeds is not None and negative_prompt_embeds.shape[0] not in (1, batch_size):
            raise ValueError(
                f"`negative_prompt_embeds` has batch size {negative_prompt_embeds.shape[0]}; expected 1 or {batch_size}."
            )
        if nasa_scale is not None:
            check_nasa_scale(nasa_scale)
        if not (isinstance(guidance_scale, (int, float)) and math.isfinite(guidance_scale) and guidance_scale >= 1):
            raise ValueError(f"`guidance_scale` must be a finite number >= 1 (1 disables CFG), got {guidance_scale}.")
        if guidance_scale > 1 and nasa_scale_given and nasa_scale > 0:
            raise ValueError(
                "`guidance_scale` > 1 uses the negative prompt as CFG's unconditional branch; NASA cannot run in the "
                "same call: set `nasa_scale=0` or `guidance_scale=1`."
            )
        if timesteps is None and (not isinstance(num_inference_steps, int) or num_inference_steps < 1):
            raise ValueError(f"`num_inference_steps` must be an integer >= 1, got {num_inference_steps}.")
        if timesteps is not None:
            num_train = self.scheduler.config.num_train_timesteps
            steps = [int(t) for t in timesteps]
            if not steps or any(t < 0 or t >= num_train for t in steps):
                raise ValueError(f"`timesteps` must be a non-empty list of integers in [0, {num_train}), got {steps}.")
            if any(a <= b for a, b in zip(steps, steps[1:])):
                raise ValueError(f"`timesteps` must be strictly descending, got {steps}.")
        for name, size in (("height", height), ("width", width)):
            if size is not None and (not isinstance(size, int) or size <= 0 or size % self.vae_scale_factor):
                raise ValueError(f"`{name}` must be a positive multiple of {self.vae_scale_factor}, got {size}.")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be an integer >= 1, got {num_images_per_prompt}.")
        total = batch_size * num_images_per_prompt
        if isinstance(generator, list) and len(generator) != total:
            raise ValueError(
                f"`generator` is a list of {len(generator)} generators; expected {total} "
                "(batch size x num_images_per_prompt), or a single generator."
            )
        if latents is not None and latents.shape[0] != total:
            raise ValueError(f"`latents` has batch size {latents.shape[0]}; expected {total}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        unknown = [k for k in callback_on_step_end_tensor_inputs or [] if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` has {unknown}; allowed: {self._callback_tensor_inputs}."
            )
        return batch_size

    def prepare_latents(self, batch_size, num_channels, height, width, dtype, device, generator, latents=None):
        r"""Initial noise `z` of shape `(batch, C, height / f, width / f)`, scaled by `init_noise_sigma`."""
        shape = (batch_size, num_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"`latents` has shape {tuple(latents.shape)}; expected {shape}.")
        else:
            latents = latents.to(device=device, dtype=dtype)
        return latents * self.scheduler.init_noise_sigma

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        r"""VAE decode with the VAE's `scaling_factor` (and `shift_factor` where it has one); returns `[-1, 1]`."""
        latents = latents.to(_first_tensor(self.vae).dtype) / self.vae.config.scaling_factor
        if getattr(self.vae.config, "shift_factor", None):
            latents = latents + self.vae.config.shift_factor
        return self.vae.decode(latents, return_dict=False)[0]

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
                `floor(t_init (1 - i / K))`.
            timesteps (`list[int]`, *optional*): custom strictly descending timesteps (overrides
                `num_inference_steps`).
            guidance_scale (`float`, defaults to 1.0): output-space CFG, opt-in (> 1); the negative prompt then acts
                as the unconditional branch and NASA is off. Costs a second UNet evaluation per step.
            height, width (`int`, *optional*): image size; defaults to the UNet's sample size times the VAE factor.
            num_images_per_prompt (`int`, defaults to 1): images per prompt.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): one, or one per image.
            latents (`torch.Tensor`, *optional*): the initial noise `z`, `(batch, C, h, w)`.
            prompt_embeds, negative_prompt_embeds (`torch.Tensor`, *optional*): precomputed text features.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"`, `"pt"` or `"latent"`.
            return_dict (`bool`, defaults to True): return a `OneStepPipelineOutput` instead of a tuple.
            cross_attention_kwargs (`dict`, *optional*): passed to the attention processors (`scale` sets LoRA scale).
            clip_skip (`int`, *optional*): CLIP layers to skip.
            callback_on_step_end (`Callable`, *optional*): `callback(pipe, step, timestep, callback_kwargs) -> dict`
                after every step; the returned tensors replace the pipeline's.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*): tensors handed to the callback, from
                `_callback_tensor_inputs`; defaults to `["latents"]`.

        Returns:
            `OneStepPipelineOutput` (or `(images, nfe)` with `return_dict=False`).
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        nasa_scale_given = nasa_scale is not None
        nasa_scale = self.config.nasa_scale if nasa_scale is None else nasa_scale

        # 1. Check inputs (raises before any work)
        batch_size = self.check_inputs(
            prompt, negative_prompt, nasa_scale, guidance_scale, num_inference_steps, timesteps, height, width,
            num_images_per_prompt, generator, latents, prompt_embeds, negative_prompt_embeds, output_type,
            callback_on_step_end_tensor_inputs, nasa_scale_given,
        )  # fmt: skip
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        device = self._execution_device
        do_cfg = guidance_scale > 1
        lora_scale = (cross_attention_kwargs or {}).get("scale")

        # 2. Encode the prompts: positive, negative (for NASA or CFG) or empty (CFG without a negative), in one
        # text-encoder call when both are text
        has_negative = negative_prompt is not None or negative_prompt_embeds is not None
        needs_negative = has_negative or do_cfg
        if needs_negative and negative_prompt_embeds is None:
            negative_prompt = "" if negative_prompt is None else negative_prompt
            negative_prompt = [negative_prompt] * batch_size if isinstance(negative_prompt, str) else negative_prompt
        if prompt_embeds is None and needs_negative and negative_prompt_embeds is None:
            prompt = [prompt] if isinstance(prompt, str) else prompt
            both = self.encode_prompt(prompt + negative_prompt, device, 1, None, lora_scale, clip_skip)
            prompt_embeds, negative_prompt_embeds = both.split(batch_size)
        else:
            prompt_embeds = self.encode_prompt(prompt, device, 1, prompt_embeds, lora_scale, clip_skip)
            if needs_negative:
                if negative_prompt_embeds is not None and negative_prompt_embeds.shape[0] == 1:
                    negative_prompt_embeds = negative_prompt_embeds.expand(batch_size, -1, -1)
                negative_prompt_embeds = self.encode_prompt(
                    negative_prompt, device, 1, negative_prompt_embeds, lora_scale, clip_skip
                )
        prompt_embeds = repeat_embeddings(prompt_embeds, num_images_per_prompt)
        if needs_negative:
            negative_prompt_embeds = repeat_embeddings(negative_prompt_embeds, num_images_per_prompt)

        # 3. Timesteps of the student
        self.scheduler.set_timesteps(num_inference_steps=None if timesteps else num_inference_steps,
                                     device=device, timesteps=timesteps)  # fmt: skip
        timesteps = self.scheduler.timesteps

        # 4. Initial noise z
        latents = self.prepare_latents(
            batch_size * num_images_per_prompt, self.unet.config.in_channels, height, width, prompt_embeds.dtype,
            device, generator, latents,
        )  # fmt: skip

        # 5. Student steps: UNet at the conditioning timestep, x0, re-noise if more steps
        use_nasa = has_negative and not do_cfg and nasa_scale > 0
        nasa = nasa_attention(self.unet, negative_prompt_embeds, nasa_scale) if use_nasa else nullcontext()
        progress = self.progress_bar(total=len(timesteps)) if len(timesteps) > 1 else nullcontext()
        denoised = latents
        with nasa, progress:
            for i, t in enumerate(timesteps):
                model_input = self.scheduler.scale_model_input(latents, t)
                if do_cfg:
                    model_output = self.unet(
                        torch.cat([model_input] * 2), t,
                        encoder_hidden_states=torch.cat([negative_prompt_embeds, prompt_embeds]),
                        cross_attention_kwargs=cross_attention_kwargs, return_dict=False,
                    )[0]  # fmt: skip
                    uncond, cond = model_output.chunk(2)
                    model_output = classifier_free_guidance(uncond, cond, guidance_scale)
                else:
                    model_output = self.unet(
                        model_input, t, encoder_hidden_states=prompt_embeds,
                        cross_attention_kwargs=cross_attention_kwargs, return_dict=False,
                    )[0]  # fmt: skip
                latents, denoised = self.scheduler.step(
                    model_output, t, latents, generator=generator, return_dict=False
                )

                if callback_on_step_end is not None:
                    local_vars = locals()
                    callback_kwargs = {k: local_vars[k] for k in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                    latents = callback_outputs.pop("latents", latents)
                    denoised = callback_outputs.pop("denoised", denoised)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                if len(timesteps) > 1:
                    progress.update()

        # 6. Decode
        # (after the last step the scheduler returns latents == denoised: the clean x0)
        if output_type == "latent":
            image = latents
        else:
            image = self.decode_latents(latents)
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()

        nfe = len(timesteps) * (2 if do_cfg else 1)
        if not return_dict:
            return (image, nfe)
        return OneStepPipelineOutput(images=image, nfe=nfe)
