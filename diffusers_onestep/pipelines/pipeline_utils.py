"""The shared layer of our pipelines: input checks, latents, decoding, output types, callbacks, NASA, offload.

`OneStepPipeline`, `AdaptiveCollabPipeline` and the backbone siblings compose these pieces instead of repeating them.
Checks are plain functions (keyword-only, one message per argument, naming the argument and the allowed values) so a
pipeline validates every argument before any work; `OneStepPipelineMixin` holds what needs `self` (the VAE factor read
from the VAE, the fast execution device, the callback state diffusers' built-in callbacks read).
"""

from __future__ import annotations

import copy
import inspect
import itertools
import math
import os
from collections.abc import Callable
from contextlib import nullcontext

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor

from ..attention.context import guided_cross_attention
from ..attention.nasa import check_nasa_scale, nasa_attention
from ..models.backbones import BACKBONES, BackboneAdapter, cat_conditioning
from ..models.denoiser import classifier_free_guidance
from ..schedulers.scheduling_consistency_student import ConsistencyStudentScheduler
from .loading import check_safetensors_only, load_pipeline, read_student_config


__all__ = [
    "OUTPUT_TYPES",
    "OneStepPipelineMixin",
    "check_embeds",
    "check_generator",
    "check_image_size",
    "check_latents",
    "check_num_images_per_prompt",
    "check_output_type",
    "check_prompts",
    "check_fits_in_memory",
    "decode_latents",
    "first_tensor",
    "vae_scale_factor_of",
]

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def first_tensor(module: torch.nn.Module) -> torch.Tensor | None:
    r"""The first parameter or buffer of `module` (what `ModelMixin.device` returns, without its module walk)."""
    return next(itertools.chain(module.parameters(), module.buffers()), None)


def vae_scale_factor_of(vae) -> int:
    r"""The spatial down-sampling factor of `vae`, read from its config (`2 ** (levels - 1)`), never assumed to be 8."""
    if vae is None:
        return 8
    return 2 ** (len(vae.config.block_out_channels) - 1)


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    r"""VAE decode with the VAE's `scaling_factor` (and `shift_factor` where it has one); returns `[-1, 1]` images."""
    latents = latents.to(first_tensor(vae).dtype) / vae.config.scaling_factor
    if getattr(vae.config, "shift_factor", None):
        latents = latents + vae.config.shift_factor
    return vae.decode(latents, return_dict=False)[0]


def _is_str_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(p, str) for p in value)


def check_prompts(
    *,
    prompt,
    negative_prompt=None,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    text_required: bool = False,
    embed_dim: int | None = None,
) -> int:
    r"""
    Validates the prompt arguments and returns the prompt batch size. `text_required` refuses `prompt_embeds` (the
    adaptive pipeline's oracle reads the text); `embed_dim` is the width the denoiser's cross-attention expects.
    """
    if text_required and (prompt is None or not (isinstance(prompt, str) or (_is_str_list(prompt) and prompt))):
        raise ValueError(f"`prompt` must be a `str` or a non-empty `list[str]` (the oracle reads it), got {prompt!r}.")
    if (prompt is None) == (prompt_embeds is None):
        raise ValueError("Pass exactly one of `prompt` or `prompt_embeds` (got both or neither).")
    if prompt is not None and not (isinstance(prompt, str) or _is_str_list(prompt)):
        raise ValueError(f"`prompt` must be a `str` or a `list[str]`, got {type(prompt)}.")
    if prompt_embeds is not None and (
        not torch.is_tensor(prompt_embeds) or prompt_embeds.ndim != 3 or prompt_embeds.shape[0] == 0
    ):
        shape = tuple(prompt_embeds.shape) if torch.is_tensor(prompt_embeds) else type(prompt_embeds)
        raise ValueError(f"`prompt_embeds` must be a (batch, tokens, dim) tensor, got {shape}.")
    batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
    if batch_size == 0:
        raise ValueError("`prompt` must not be an empty list.")
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ValueError("Pass at most one of `negative_prompt` or `negative_prompt_embeds` (got both).")
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        if not _is_str_list(negative_prompt):
            raise ValueError(f"`negative_prompt` must be a `str` or a `list[str]`, got {type(negative_prompt)}.")
        if len(negative_prompt) != batch_size:
            raise ValueError(
                f"`negative_prompt` has batch size {len(negative_prompt)} but `prompt` has {batch_size}: pass one "
                "string for all prompts or one negative per prompt."
            )
    if negative_prompt_embeds is not None:
        if not torch.is_tensor(negative_prompt_embeds) or negative_prompt_embeds.ndim != 3:
            raise ValueError("`negative_prompt_embeds` must be a (batch, tokens, dim) tensor.")
        if negative_prompt_embeds.shape[0] not in (1, batch_size):
            raise ValueError(
                f"`negative_prompt_embeds` has batch size {negative_prompt_embeds.shape[0]}; expected 1 or "
                f"{batch_size}."
            )
    for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
        check_embeds(embeds, name=name, embed_dim=embed_dim)
    return batch_size


def check_embeds(embeds: torch.Tensor | None, *, name: str, embed_dim: int | None = None) -> None:
    r"""Refuses embeddings of the wrong width and non-finite embeddings (they would give NaN images silently)."""
    if embeds is None:
        return
    if embed_dim is not None and embeds.shape[-1] != embed_dim:
        raise ValueError(f"`{name}` has last dimension {embeds.shape[-1]}; the denoiser expects {embed_dim}.")
    if embeds.is_floating_point() and not torch.isfinite(embeds).all():
        raise ValueError(f"`{name}` contains NaN or infinite values.")


def check_image_size(*, height: int | None, width: int | None, vae_scale_factor: int) -> None:
    r"""`height` and `width` must be positive multiples of the VAE factor (or `None` for the default size)."""
    for name, size in (("height", height), ("width", width)):
        if size is not None and (
            not isinstance(size, int) or isinstance(size, bool) or size <= 0 or size % vae_scale_factor
        ):
            raise ValueError(f"`{name}` must be a positive multiple of {vae_scale_factor}, got {size}.")


def check_num_images_per_prompt(num_images_per_prompt) -> None:
    if not isinstance(num_images_per_prompt, int) or isinstance(num_images_per_prompt, bool) or num_images_per_prompt < 1:
        raise ValueError(f"`num_images_per_prompt` must be an integer >= 1, got {num_images_per_prompt}.")


def check_generator(generator, *, total: int) -> None:
    r"""
    `generator` must be `None`, a `torch.Generator`, or a list of exactly `total` of them (one per image). numpy
    generators and integer seeds are refused with a message saying how to make a `torch.Generator`.
    """
    hint = "use `torch.Generator(device).manual_seed(seed)`"
    if generator is None or isinstance(generator, torch.Generator):
        return
    if isinstance(generator, list):
        if len(generator) != total:
            raise ValueError(
                f"`generator` is a list of {len(generator)} generators; expected {total} "
                "(batch size x num_images_per_prompt), or a single generator."
            )
        bad = [i for i, g in enumerate(generator) if not isinstance(g, torch.Generator)]
        if bad:
            raise ValueError(
                f"`generator` must hold only `torch.Generator`s; entries {bad} are "
                f"{sorted({type(generator[i]).__name__ for i in bad})} ({hint})."
            )
        return
    raise ValueError(
        f"`generator` must be a `torch.Generator` or a list of them, got {type(generator).__name__} ({hint})."
    )


def check_latents(latents, *, shape: tuple[int, ...] | None = None, total: int | None = None) -> None:
    r"""
    Initial latents must be a finite tensor of `shape` (or of batch `total`). They may live on any device and dtype:
    the pipeline moves them to its execution device and the prompt embeddings' dtype, as diffusers' pipelines do.
    """
    if latents is None:
        return
    if not torch.is_tensor(latents) or latents.ndim != 4:
        got = tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
        raise ValueError(f"`latents` must be a (batch, C, h, w) tensor, got {got}.")
    if total is not None and latents.shape[0] != total:
        raise ValueError(f"`latents` has batch size {latents.shape[0]}; expected {total}.")
    if shape is not None and tuple(latents.shape) != tuple(shape):
        raise ValueError(f"`latents` has shape {tuple(latents.shape)}; expected {tuple(shape)}.")
    if not torch.isfinite(latents).all():
        raise ValueError("`latents` contains NaN or infinite values.")


def check_output_type(output_type) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")


def _available_memory(device: torch.device) -> int | None:
    """Free bytes on an accelerator, or the machine's physical memory for the CPU (`None` where unknown)."""
    try:
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[0]
        if device.type == "cpu":
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, RuntimeError, ValueError):
        return None
    return None


def check_fits_in_memory(
    *, total: int, height: int, width: int, channels: int, device: torch.device, num_images_per_prompt: int
) -> None:
    r"""
    Refuses a request whose decoded float32 images alone (`total x channels x height x width x 4` bytes, a lower bound
    of what the call allocates) exceed the device's free memory (the physical memory on the CPU), before any work, with
    the largest `num_images_per_prompt` that could fit.
    """
    available = _available_memory(torch.device(device))
    if available is None:
        return
    per_image = max(channels, 3) * height * width * 4
    if total * per_image > available:
        batch = max(total // num_images_per_prompt, 1)
        fits = max(available // (per_image * batch), 0)
        raise ValueError(
            f"`num_images_per_prompt`={num_images_per_prompt} asks for {total} images of {height}x{width}: the decoded "
            f"images alone need {total * per_image / 2**30:.1f} GiB, more than the {available / 2**30:.1f} GiB "
            f"available on {device}; use at most {fits} per prompt (or call the pipeline in smaller batches)."
        )


def share_weights_copy(module: torch.nn.Module) -> torch.nn.Module:
    r"""
    A new module tree whose parameters and buffers are the **same tensors** as `module`'s: adapters injected into the
    copy (peft replaces its layers) leave `module` untouched, at the cost of the module objects only, no weights.
    """
    memo = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    shared = copy.deepcopy(module, memo)
    shared.__dict__["_onestep_shares_weights"] = True
    return shared


def _unshare_adapted_weights(module: torch.nn.Module) -> None:
    """Gives every LoRA-adapted layer of a weight-sharing copy its own base weights (before fusing into them)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for layer in module.modules():
        if isinstance(layer, BaseTunerLayer):
            base = layer.get_base_layer()
            for name, param in list(base.named_parameters(recurse=False)):
                setattr(base, name, torch.nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad))


class OneStepPipelineMixin:
    r"""
    What our pipelines share beyond `DiffusionPipeline`: the VAE factor and image processor, a fast execution device,
    latents, decoding and output types, the callback loop with the state diffusers' built-in callbacks read
    (`num_timesteps`, `guidance_scale`, `_guidance_scale`, `do_classifier_free_guidance`, `cross_attention_kwargs`,
    `clip_skip`, `interrupt`), and the scheduler calls made the way diffusers' `retrieve_timesteps` and
    `prepare_extra_step_kwargs` make them, so any compatible diffusers scheduler runs.
    """

    backbone: BackboneAdapter = BACKBONES["sd"]
    # callback tensor name -> key of the conditioning dict (diffusers' names for what its pipelines hold)
    _callback_conditioning = {"prompt_embeds": "encoder_hidden_states"}
    _guidance_scale: float = 1.0
    _num_timesteps: int = 0
    _cross_attention_kwargs: dict | None = None
    _clip_skip: int | None = None
    _interrupt: bool = False

    # the modules a student takes from its teacher (besides the network and the scheduler), and the network's class
    _teacher_components: tuple[str, ...] = ("vae", "text_encoder", "tokenizer")
    _text_encoders: tuple[str, ...] = ("text_encoder",)
    _network_class_name: str = "UNet2DConditionModel"
    default_nasa_scale: float = 0.1
    # set by `diffusers_onestep.nasa(pipe, ...)` for its block: negatives and guidance for calls that pass none
    context_guidance: dict | None = None

    def apply_context_guidance(self, nasa_scale, **negatives) -> tuple:
        r"""
        `(nasa_scale, negatives)` for this call: inside a `diffusers_onestep.nasa` block, a call without a negative
        gets the block's (the keys of `negatives` that the block sets) and its guidance's scale; otherwise unchanged.
        """
        context = self.context_guidance
        if context is None or any(value is not None for value in negatives.values()):
            return nasa_scale, negatives
        negatives = {key: context.get(key) for key in negatives}
        return context["guidance"].scale, negatives

    def _init_image_processor(self) -> None:
        self.vae_scale_factor = vae_scale_factor_of(getattr(self, "vae", None))
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        r"""Output-space CFG runs iff `guidance_scale > 1` (so 0 and 1 both mean no guidance, as in diffusers)."""
        return self._guidance_scale > 1

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def cross_attention_kwargs(self) -> dict | None:
        return self._cross_attention_kwargs

    @property
    def clip_skip(self) -> int | None:
        return self._clip_skip

    @property
    def interrupt(self) -> bool:
        return self._interrupt

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
        devices = [first_tensor(c).device for c in components if first_tensor(c) is not None]
        return next(
            (d for d in devices if d.type not in ("cpu", "meta")), devices[0] if devices else torch.device("cpu")
        )

    # ---------------------------------------------------------------- checks

    def check_generation_inputs(
        self,
        *,
        batch_size: int,
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
        output_type,
        callback_on_step_end,
        callback_on_step_end_tensor_inputs,
    ) -> None:
        r"""The checks every one-step pipeline makes after its prompt checks; raises before any work."""
        if nasa_scale is not None:
            check_nasa_scale(nasa_scale)
        if not (
            isinstance(guidance_scale, (int, float))
            and not isinstance(guidance_scale, bool)
            and math.isfinite(guidance_scale)
            and guidance_scale >= 0
        ):
            raise ValueError(
                f"`guidance_scale` must be a finite number >= 0 (CFG runs only above 1; 0 and 1 mean none), got "
                f"{guidance_scale}."
            )
        if guidance_scale > 1 and nasa_scale_given and nasa_scale > 0:
            raise ValueError(
                "`guidance_scale` > 1 uses the negative prompt as CFG's unconditional branch; NASA cannot run in the "
                "same call: set `nasa_scale=0` or `guidance_scale<=1`."
            )
        if timesteps is None and (
            not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1
        ):
            raise ValueError(f"`num_inference_steps` must be an integer >= 1, got {num_inference_steps}.")
        if timesteps is not None:
            num_train = self.scheduler.config.num_train_timesteps
            steps = [int(t) for t in timesteps]
            if not steps or any(t < 0 or t >= num_train for t in steps):
                raise ValueError(f"`timesteps` must be a non-empty list of integers in [0, {num_train}), got {steps}.")
            if any(a <= b for a, b in zip(steps, steps[1:])):
                raise ValueError(f"`timesteps` must be strictly descending, got {steps}.")
        check_image_size(height=height, width=width, vae_scale_factor=self.vae_scale_factor)
        check_num_images_per_prompt(num_images_per_prompt)
        total = batch_size * num_images_per_prompt
        check_generator(generator, total=total)
        check_latents(latents, total=total)
        check_output_type(output_type)
        self.check_callback_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        size = self.default_sample_size * self.vae_scale_factor
        check_fits_in_memory(
            total=total, height=height or size, width=width or size, channels=self.vae.config.out_channels,
            device=self._execution_device, num_images_per_prompt=num_images_per_prompt,
        )  # fmt: skip

    def begin_call(self, height, width, guidance_scale, cross_attention_kwargs=None, clip_skip=None) -> tuple[int, int]:
        r"""Sets the per-call state the callbacks read and returns the image size (the network's default if unset)."""
        self._guidance_scale = guidance_scale
        self._cross_attention_kwargs = cross_attention_kwargs
        self._clip_skip = clip_skip
        self._interrupt = False
        size = self.default_sample_size * self.vae_scale_factor
        return height or size, width or size

    @property
    def default_sample_size(self) -> int:
        r"""The network's latent sample size (the default image size is this times the VAE factor)."""
        return self.denoiser_network.config.sample_size

    # ---------------------------------------------------------------- scheduler calls

    def retrieve_timesteps(self, num_inference_steps: int | None, device, timesteps: list[int] | None):
        r"""`set_timesteps` the way diffusers' `retrieve_timesteps` calls it: custom `timesteps` only where accepted."""
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

        if timesteps is not None and "timesteps" not in inspect.signature(self.scheduler.set_timesteps).parameters:
            raise ValueError(
                f"`timesteps`: the scheduler {type(self.scheduler).__name__} does not accept custom timesteps; pass "
                "`num_inference_steps` instead, or use a scheduler that does (ConsistencyStudentScheduler, LCM, TCD, "
                "DDPM, Euler)."
            )
        return retrieve_timesteps(self.scheduler, None if timesteps else num_inference_steps, device, timesteps)

    def prepare_extra_step_kwargs(self, generator) -> dict:
        r"""The optional `step` arguments this scheduler accepts (`generator`), as diffusers' pipelines pass them."""
        accepted = inspect.signature(self.scheduler.step).parameters
        return {"generator": generator} if "generator" in accepted else {}

    def scheduler_step(self, model_output, t, latents, extra_step_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        r"""One scheduler step; returns `(prev_sample, denoised)` (`denoised` is the predicted x0 where reported)."""
        output = self.scheduler.step(model_output, t, latents, **extra_step_kwargs, return_dict=True)
        denoised = getattr(output, "denoised", None)
        if denoised is None:
            denoised = getattr(output, "pred_original_sample", None)
        return output.prev_sample, output.prev_sample if denoised is None else denoised

    # ---------------------------------------------------------------- latents, decoding, callbacks

    def prepare_latents(self, batch_size, num_channels, height, width, dtype, device, generator, latents=None):
        r"""Initial noise `z` of shape `(batch, C, height / f, width / f)`, scaled by `init_noise_sigma`."""
        shape = (batch_size, num_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            check_latents(latents, shape=shape)
            latents = latents.to(device=device, dtype=dtype)
        return latents * self.scheduler.init_noise_sigma

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        r"""VAE decode with the VAE's `scaling_factor` (and `shift_factor`); returns `[-1, 1]` (`decode_latents`)."""
        return decode_latents(self.vae, latents)

    def postprocess_latents(self, latents: torch.Tensor, output_type: str):
        r"""Latents to the requested output: unchanged for `"latent"`, else decoded and post-processed."""
        if output_type == "latent":
            return latents
        return self.image_processor.postprocess(self.decode_latents(latents), output_type=output_type)

    @staticmethod
    def callback_tensor_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs) -> list[str]:
        r"""The tensor names handed to the callback: a `PipelineCallback`'s own, else the given list or `["latents"]`."""
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            return callback_on_step_end.tensor_inputs
        return callback_on_step_end_tensor_inputs or ["latents"]

    def check_callback_inputs(self, callback_on_step_end: Callable | None, tensor_inputs: list[str]) -> None:
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise ValueError(f"`callback_on_step_end` must be callable, got {type(callback_on_step_end)}.")
        unknown = [k for k in tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` has {unknown}; allowed: {self._callback_tensor_inputs}."
            )

    def run_callback(self, callback_on_step_end, i, t, tensor_inputs, tensors: dict) -> dict:
        r"""Calls the step-end callback with the requested tensors and returns `tensors` updated with its outputs."""
        if callback_on_step_end is None:
            return tensors
        outputs = callback_on_step_end(self, i, t, {k: tensors[k] for k in tensor_inputs}) or {}
        return {**tensors, **{k: v for k, v in outputs.items() if k in tensors}}


    # ---------------------------------------------------------------- the sampling loop

    @property
    def denoiser_network(self) -> torch.nn.Module:
        r"""The denoising network: `self.unet` or `self.transformer`, per the backbone."""
        return getattr(self, self.backbone.network_attribute)

    def nasa_context(self, negative: dict | None, nasa_scale):
        r"""
        NASA on the network's cross-attention for the block, with the negative as those layers see it; inside a
        `diffusers_onestep.nasa` block, that block's guidance (NASA or NAG, with its `end` fraction) instead.
        """
        if negative is None:
            return nullcontext()
        network = self.denoiser_network
        features, mask = self.backbone.nasa_negative(network, negative)
        if self.context_guidance is not None:
            return guided_cross_attention(
                network, {"embeds": features, "mask": mask}, self.context_guidance["guidance"],
                timestep_range=float(self.scheduler.config.num_train_timesteps),
            )  # fmt: skip
        return nasa_attention(network, features, nasa_scale, negative_attention_mask=mask)

    def denoising_loop(
        self,
        *,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond: dict,
        negative: dict | None,
        nasa_scale,
        generator,
        cross_attention_kwargs: dict | None,
        callback_on_step_end,
        tensor_inputs: list[str],
    ) -> tuple[torch.Tensor, int]:
        r"""
        Runs the scheduler over `timesteps` with the backbone's network and returns `(latents, nfe)`.

        `negative` is the negative (or, under CFG without one, the empty-prompt) conditioning: under output-space CFG
        (`do_classifier_free_guidance`, re-read every step so a callback can switch it off) it is the unconditional
        branch, batched before `cond` as `StableDiffusionPipeline` batches them; otherwise it reaches the
        cross-attention through NASA when `nasa_scale > 0`. `nfe` counts the network evaluations per image.
        """
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator)
        network = self.denoiser_network
        use_cfg = self.do_classifier_free_guidance
        use_nasa = negative is not None and not use_cfg and torch.as_tensor(nasa_scale).abs().sum() > 0
        if use_cfg:
            cond = cat_conditioning(negative, cond)
        nasa = self.nasa_context(negative, nasa_scale) if use_nasa else nullcontext()
        progress = self.progress_bar(total=len(timesteps)) if len(timesteps) > 1 else nullcontext()
        denoised, nfe = latents, 0
        with nasa, progress:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                cfg = self.do_classifier_free_guidance and cond["encoder_hidden_states"].shape[0] == 2 * len(latents)
                model_input = self.scheduler.scale_model_input(torch.cat([latents] * 2) if cfg else latents, t)
                model_output = self.backbone(network, model_input, t, cond, cross_attention_kwargs)
                nfe += 2 if cfg else 1
                if cfg:
                    uncond_output, cond_output = model_output.chunk(2)
                    model_output = classifier_free_guidance(uncond_output, cond_output, self.guidance_scale)
                latents, denoised = self.scheduler_step(model_output, t, latents, extra_step_kwargs)

                if callback_on_step_end is not None:
                    names = self._callback_conditioning
                    tensors = {"latents": latents, "denoised": denoised, **{n: cond[k] for n, k in names.items()},
                               "negative_prompt_embeds": None if negative is None else negative["encoder_hidden_states"]}
                    tensors = self.run_callback(callback_on_step_end, i, t, tensor_inputs, tensors)  # fmt: skip
                    latents, denoised = tensors["latents"], tensors["denoised"]
                    cond = {**cond, **{k: tensors[n] for n, k in names.items()}}
                if len(timesteps) > 1:
                    progress.update()
        return latents, nfe

    def generate(
        self,
        *,
        total: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        num_inference_steps: int,
        timesteps: list[int] | None,
        generator,
        latents: torch.Tensor | None,
        cond: dict,
        negative: dict | None,
        nasa_scale,
        cross_attention_kwargs: dict | None,
        callback_on_step_end,
        tensor_inputs: list[str],
        output_type: str,
    ):
        r"""
        Steps 3-6 of every one-step pipeline once the prompts are encoded: timesteps (as `retrieve_timesteps` sets
        them), the initial noise, `denoising_loop`, decoding to `output_type`. Returns `(images, nfe)`.
        """
        timesteps, _ = self.retrieve_timesteps(num_inference_steps, device, timesteps)
        self._num_timesteps = len(timesteps)
        channels = self.denoiser_network.config.in_channels
        latents = self.prepare_latents(total, channels, height, width, dtype, device, generator, latents)
        latents, nfe = self.denoising_loop(
            latents=latents, timesteps=timesteps, cond=cond, negative=negative, nasa_scale=nasa_scale,
            generator=generator, cross_attention_kwargs=cross_attention_kwargs,
            callback_on_step_end=callback_on_step_end, tensor_inputs=tensor_inputs,
        )  # fmt: skip
        image = self.postprocess_latents(latents, output_type)
        self.maybe_free_model_hooks()
        return image, nfe

    # ---------------------------------------------------------------- building from a teacher, saving

    @classmethod
    def _from_teacher(
        cls, teacher, *, network=None, lora=None, t_init=None, input_type=None, nasa_scale=None, dtype=None,
        **scheduler_kwargs,
    ):  # fmt: skip
        r"""The body of every `from_teacher` (see `OneStepPipeline.from_teacher` for the rules)."""
        import diffusers

        network_name = cls.backbone.network_attribute
        if network is None and lora is None:
            raise ValueError(f"Pass the student as `{network_name}` (full weights) or `lora` (LoRA weights), or both.")
        if input_type is not None and input_type not in ("noise", "scaled_noise"):
            raise ValueError(f"`input_type` must be one of ('noise', 'scaled_noise'), got {input_type!r}.")
        if nasa_scale is not None:
            check_nasa_scale(nasa_scale)
        for name, path in ((network_name, network), ("lora", lora)):
            if isinstance(path, (str, os.PathLike)):
                check_safetensors_only(path, name)
        load_kwargs = {"dtype": dtype, "use_safetensors": True} if dtype else {"use_safetensors": True}

        # 1. The student's own saved config (scheduler and nasa_scale), from its directory
        student_scheduler, student_extra = read_student_config(network)
        if student_scheduler is None:
            student_scheduler, lora_extra = read_student_config(lora)
            student_extra = {**lora_extra, **student_extra}

        # 2. The student network (loaded before the teacher, so the teacher's is not loaded for nothing)
        if isinstance(network, (str, os.PathLike)):
            subfolder = network_name if os.path.isdir(os.path.join(network, network_name)) else None
            network_class = getattr(diffusers, cls._network_class_name)
            network = network_class.from_pretrained(network, subfolder=subfolder, **load_kwargs)

        # 3. The teacher's components; a LoRA goes into weight-sharing copies, never into the teacher's modules
        owned = isinstance(teacher, (str, os.PathLike))
        if owned:
            overrides = {network_name: network} if network is not None else {}
            teacher = load_pipeline(teacher, "teacher", **({"dtype": dtype} if dtype else {}), **overrides)
        required = (*cls._teacher_components, network_name, "scheduler")
        missing = [name for name in required if not hasattr(teacher, name)]
        if missing:
            raise ValueError(
                f"`teacher` must be a pipeline with {list(required)} for {cls.__name__}; {type(teacher).__name__} "
                f"lacks {missing}."
            )
        parts = {name: getattr(teacher, name) for name in cls._teacher_components}
        if network is None:
            network = getattr(teacher, network_name)
        if lora is not None and not owned:
            if network is getattr(teacher, network_name):
                network = share_weights_copy(network)
            for name in cls._text_encoders:
                if parts.get(name) is not None:
                    parts[name] = share_weights_copy(parts[name])

        # 4. The scheduler: the student's saved config, else the teacher's; explicit arguments override either
        explicit = {"t_init": t_init, "input_type": input_type, **scheduler_kwargs}
        explicit = {key: value for key, value in explicit.items() if value is not None}
        if student_scheduler is not None:
            overridden = {k: v for k, v in explicit.items() if k in student_scheduler and student_scheduler[k] != v}
            if overridden:
                logger.info(f"Overriding the student's saved scheduler config with {overridden}.")
            scheduler = ConsistencyStudentScheduler.from_config(student_scheduler, **explicit)
        else:
            scheduler = ConsistencyStudentScheduler.from_config(teacher.scheduler.config, **explicit)
        if nasa_scale is None:
            nasa_scale = student_extra.get("nasa_scale", cls.default_nasa_scale)

        pipe = cls(**parts, **{network_name: network}, scheduler=scheduler, nasa_scale=nasa_scale)
        if lora is not None:
            # peft marks the base weights `requires_grad=False`; they are the teacher's tensors, and the flag alone
            # changes which CPU kernels run (outputs move by an ulp), so it is put back as the teacher had it
            shared = [m for m in (network, *parts.values()) if isinstance(m, torch.nn.Module)]
            flags = [(p, p.requires_grad) for m in shared for p in m.parameters()]
            pipe.load_student_lora(lora)
            for param, flag in flags:
                param.requires_grad_(flag)
        return pipe

    def load_student_lora(self, lora) -> None:
        r"""Loads student LoRA weights through the pipeline's `load_lora_weights` (diffusers' loader, or PEFT)."""
        self.load_lora_weights(lora, use_safetensors=True)

    def _unshare_before_fusing(self, components) -> None:
        r"""Gives a weight-sharing student's adapted layers their own weights, so fusing never changes the teacher."""
        for name in components:
            module = getattr(self, name, None)
            if module is not None and module.__dict__.get("_onestep_shares_weights"):
                _unshare_adapted_weights(module)

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True, **kwargs):
        r"""
        `DiffusionPipeline.save_pretrained`, always in safetensors. A pipeline with a LoRA adapter loaded is refused
        with what to do (such a directory would not reload): save the adapter alone, or bake it in first.
        """
        self._refuse_saving_adapters()
        if not safe_serialization:
            raise ValueError("`safe_serialization` must be True (or left unset): weights are saved as safetensors.")
        return super().save_pretrained(save_directory, safe_serialization=True, **kwargs)

    def _refuse_saving_adapters(self) -> None:
        r"""Raises, with what to do, when a component carries a LoRA adapter (such a directory would not reload)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        loaded = [
            name for name, module in self.components.items()
            if isinstance(module, torch.nn.Module) and any(isinstance(m, BaseTunerLayer) for m in module.modules())
        ]  # fmt: skip
        if loaded:
            raise ValueError(
                f"`save_pretrained`: {loaded} carry a LoRA adapter, and a directory saved so would not reload. Either "
                "save the adapter alone (`pipe.save_lora_weights(save_directory, unet_lora_layers="
                "peft.utils.get_peft_model_state_dict(pipe.unet))`, or the network's `save_lora_adapter`) and reload "
                "it with `from_teacher(teacher, lora=save_directory)`, or bake it into the weights with "
                "`pipe.fuse_lora(); pipe.unload_lora_weights()` and then call `save_pretrained`."
            )
