"""`AdaptiveCollabPipeline`: the student drafts, an oracle judges, the teacher refines only where needed.

Adaptive teacher-student collaboration (Starodubcev et al., "Your Student is Better Than Expected: Adaptive
Teacher-Student Collaboration for Text-Conditional Diffusion Models", CVPR 2024, Sec. 4):

1. the student generates `X_s` in one (or a few) steps;
2. an oracle scores every `(prompt, X_s)` pair; the threshold `tau` is the k-th percentile of the oracle's scores on
   the student's samples over a calibration prompt set (`calibrate`);
3. an image with `score >= tau` is kept; the others go to the teacher, batched together: **refinement** (SDEdit: noise
   `X_s` to strength `sigma` and run the teacher img2img for about `teacher_steps` steps, with CFG) or
   **regeneration** (the teacher from the same initial noise);
4. the cost is `N_student + (share refined) * N_teacher` network evaluations per image on average, reported per call.

The teacher runs through diffusers' own `StableDiffusionImg2ImgPipeline` / `StableDiffusionPipeline`, built on the
same module objects (no second copy of the weights).
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import diffusers
import numpy as np
import PIL.Image
import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

from .loading import OneStepLoadingMixin
from .oracles import Oracle, check_scores


__all__ = ["AdaptiveCollabPipeline", "AdaptiveCollabPipelineOutput"]

logger = logging.get_logger(__name__)

CALIBRATION_NAME = "calibration.json"
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
STRATEGIES = ("refine", "regenerate")
# teacher modules that may be the student's own objects; saved once, inside the student's folder
_SHAREABLE_MODULES = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
# arguments the pipeline sets itself on the student and teacher calls
_STUDENT_RESERVED = ("prompt", "negative_prompt", "num_images_per_prompt", "generator", "latents", "height", "width",
                     "output_type", "return_dict", "num_inference_steps", "nasa_scale")  # fmt: skip
_TEACHER_RESERVED = ("prompt", "negative_prompt", "image", "strength", "num_inference_steps", "guidance_scale",
                     "num_images_per_prompt", "generator", "latents", "height", "width", "output_type",
                     "return_dict")  # fmt: skip

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import diffusers_onestep
        >>> from diffusers import StableDiffusionPipeline
        >>> from diffusers_onestep import AdaptiveCollabPipeline, CLIPScoreOracle, OneStepPipeline

        >>> teacher = StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
        >>> student = OneStepPipeline.from_teacher(teacher, unet="your-name/sd15-pgsb-student")
        >>> oracle = CLIPScoreOracle.from_pretrained("openai/clip-vit-large-patch14")
        >>> pipe = AdaptiveCollabPipeline.from_pipelines(student, teacher, oracle=oracle)
        >>> pipe.calibrate(calibration_prompts)  # stores the score percentiles k = 0..100
        >>> out = pipe("a photo of a pet", negative_prompt="cat", percentile=50)
        >>> out.refined, out.average_nfe  # which images the teacher refined, and the price paid

        >>> pipe.save_pretrained("sd15-adaptive")  # the oracle is not saved: pass it again when loading
        >>> pipe = AdaptiveCollabPipeline.from_pretrained("sd15-adaptive", oracle=oracle)
        ```
"""


@dataclass
class AdaptiveCollabPipelineOutput(BaseOutput):
    r"""
    Output of `AdaptiveCollabPipeline`.

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`):
            The final images: the student's where kept, the teacher's where refined (latents with
            `output_type="latent"`).
        scores (`torch.Tensor`):
            `(batch,)` float32: the oracle's score of each **student** image (the decisions were taken on these).
        refined (`torch.Tensor`):
            `(batch,)` bool: `True` where the image went to the teacher.
        nfe (`list[int]`):
            Network evaluations spent on each image: the student's UNet evaluations plus, for refined images, the
            teacher's (a CFG step counts two). The oracle is not counted.
        average_nfe (`float`):
            The mean of `nfe`: the price per image of this call.
        threshold (`float`):
            The oracle threshold `tau` applied (`-inf` for percentile 0, `+inf` for percentile 100).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    scores: torch.Tensor
    refined: torch.Tensor
    nfe: list[int]
    average_nfe: float
    threshold: float


class _EvaluationCounter:
    """Counts the forward calls of a denoiser and the samples they processed."""

    def __init__(self):
        self.calls = 0
        self.samples = 0

    def per_image(self, num_images: int) -> int:
        return self.samples // num_images if num_images else 0


@contextmanager
def _count_evaluations(denoiser: torch.nn.Module) -> Iterator[_EvaluationCounter]:
    """Counts what actually runs: a CFG step feeds `2 * batch` samples, hence two evaluations per image."""
    counter = _EvaluationCounter()

    def hook(module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        counter.calls += 1
        counter.samples += sample.shape[0]

    handle = denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield counter
    finally:
        handle.remove()


def _denoiser(pipeline: DiffusionPipeline) -> torch.nn.Module | None:
    """The student's or teacher's denoising network: its `unet`, or its `transformer`."""
    unet = getattr(pipeline, "unet", None)
    return unet if unet is not None else getattr(pipeline, "transformer", None)


def _decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode with `scaling_factor` (and `shift_factor` where present), as the student pipelines do; `[-1, 1]`."""
    latents = latents.to(vae.dtype) / vae.config.scaling_factor
    if getattr(vae.config, "shift_factor", None):
        latents = latents + vae.config.shift_factor
    return vae.decode(latents, return_dict=False)[0]


def _img2img_steps(teacher_steps: int, strength: float) -> int:
    """The smallest `num_inference_steps` for which img2img at `strength` runs `teacher_steps` steps."""
    # img2img runs int(num_inference_steps * strength) steps; that count grows by at most 1 per step when
    # strength <= 1, so the smallest sufficient value runs exactly `teacher_steps`
    steps = max(teacher_steps, math.ceil(teacher_steps / strength) - 1)
    while int(steps * strength) < teacher_steps:
        steps += 1
    return steps


def _load_class(library: str, class_name: str) -> type:
    """The class a `model_index.json` entry names: a diffusers pipeline folder, a library or a module path."""
    from diffusers import pipelines

    if hasattr(pipelines, library):
        return getattr(getattr(pipelines, library), class_name)
    return getattr(importlib.import_module(library), class_name)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class AdaptiveCollabPipeline(OneStepLoadingMixin, DiffusionPipeline):
    r"""
    Adaptive teacher-student collaboration (Starodubcev et al., CVPR 2024): a one-step (or few-step) student drafts
    every image, an oracle scores it, and only the images scoring below a threshold go to the teacher, batched
    together, for SDEdit refinement or regeneration. A user pays the student's price for most images and the
    teacher's only for the share the oracle rejects; every call reports that price (`nfe`, `average_nfe`).

    **Decision rule.** An image is kept iff `score >= tau` (a NaN score is never kept). With `percentile=k`, `tau` is
    the k-th percentile of the calibration scores, except that `k = 0` keeps every image (the student alone) and
    `k = 100` refines every image (the teacher after the student for all), whatever the scores.

    **NFE** counts denoiser (UNet) evaluations per image, as `OneStepPipelineOutput.nfe` does: a CFG step counts two.
    Refinement at strength `sigma` runs `teacher_steps` teacher steps (img2img is asked for the smallest
    `num_inference_steps` with `int(num_inference_steps * sigma) == teacher_steps`); what actually ran is counted.
    The paper counts steps: halve the teacher's share under CFG to compare.

    **Saving.** `save_pretrained` writes the teacher's modules, the student as a nested pipeline folder (`student/`)
    and, once calibrated, `calibration.json` (the percentiles k = 0..100). Modules the student shares with the teacher
    (the same objects, e.g. the VAE, text encoder and tokenizer of `OneStepPipeline.from_teacher(teacher, ...)`) are
    written once, in `student/`, and shared again after `from_pretrained`. The oracle is not saved (a Python callable
    cannot be): pass it again, `AdaptiveCollabPipeline.from_pretrained(path, oracle=...)`, or set `pipe.oracle`.

    Args:
        student (`DiffusionPipeline`):
            The student: a `OneStepPipeline`, or any diffusers text-to-image pipeline that accepts `latents` and
            `output_type="latent"` (e.g. an LCM pipeline) and whose latents live in the teacher's latent space.
        vae (`AutoencoderKL`): the teacher's VAE.
        text_encoder (`CLIPTextModel`): the teacher's text encoder.
        tokenizer (`CLIPTokenizer`): its tokenizer.
        unet (`UNet2DConditionModel`): the teacher's UNet. If it is the student's UNet carrying the student as a LoRA
            adapter, the adapters are disabled while the teacher runs.
        scheduler (`KarrasDiffusionSchedulers`): the teacher's scheduler.
        oracle (`Oracle`, *optional*):
            `oracle(images, prompts) -> (batch,)` scores, higher is better (see `diffusers_onestep.pipelines.oracles`).
            Optional only so that it can be given after loading; generating and calibrating need one.
    """

    _optional_components = ["oracle"]

    def __init__(
        self,
        student: DiffusionPipeline,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        oracle: Oracle | Callable | None = None,
    ):
        super().__init__()
        if not isinstance(student, DiffusionPipeline) or _denoiser(student) is None:
            raise ValueError(
                f"`student` must be a diffusers text-to-image pipeline with a `unet` (a `OneStepPipeline`, an LCM "
                f"pipeline, ...), got {type(student)}."
            )
        if oracle is not None and not callable(oracle):
            raise ValueError(f"`oracle` must be callable as oracle(images, prompts) -> scores, got {type(oracle)}.")
        if unet is _denoiser(student) and not getattr(unet, "_hf_peft_config_loaded", False):
            logger.warning(
                "The student and the teacher are the same UNet without a LoRA adapter: the teacher would refine with "
                "the student's weights."
            )
        self.register_modules(
            student=student, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler
        )
        # the oracle is an optional component recorded as (None, None): a callable cannot be saved
        self.register_modules(oracle=None)
        self.oracle = oracle
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.calibration: dict[str, Any] | None = None

    @classmethod
    def from_pipelines(
        cls, student: DiffusionPipeline, teacher: DiffusionPipeline, oracle: Oracle | Callable | None = None
    ) -> AdaptiveCollabPipeline:
        r"""
        Builds the pipeline from a student pipeline and a Stable-Diffusion-like teacher pipeline, sharing (not copying)
        the teacher's `vae`, `text_encoder`, `tokenizer`, `unet` and `scheduler`.

        Args:
            student (`DiffusionPipeline`): e.g. `OneStepPipeline.from_teacher(teacher, unet=...)`.
            teacher (`DiffusionPipeline`): e.g. a `StableDiffusionPipeline`.
            oracle (`Oracle`, *optional*): the judge.
        """
        modules = {name: getattr(teacher, name, None) for name in _SHAREABLE_MODULES}
        missing = [name for name, module in modules.items() if module is None]
        if missing:
            raise ValueError(f"`teacher` must have {list(_SHAREABLE_MODULES)}; it lacks {missing}.")
        return cls(student=student, oracle=oracle, **modules)

    # ---------------------------------------------------------------- saving and loading

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        push_to_hub: bool = False,
        **kwargs,
    ):
        r"""
        Saves the teacher's modules, the student (`student/`, a complete pipeline folder) and the calibration
        (`calibration.json`), with `DiffusionPipeline.save_pretrained`'s arguments. Modules shared with the student are
        written once (in `student/`, recorded as `[null, null]` at the top level). The oracle is not saved.
        """
        os.makedirs(save_directory, exist_ok=True)
        calibration_path = os.path.join(save_directory, CALIBRATION_NAME)
        if self.calibration is not None:
            with open(calibration_path, "w", encoding="utf-8") as file:
                json.dump(self.calibration, file, indent=2)
        elif os.path.exists(calibration_path):
            os.remove(calibration_path)  # a stale calibration must not come back with other weights

        shared = [name for name in _SHAREABLE_MODULES if getattr(self.student, name, None) is getattr(self, name)]
        entries = {name: self.config[name] for name in (*shared, "student")}
        # diffusers skips optional components recorded as (None, None): hide the shared ones for this save only
        self._optional_components = [*type(self)._optional_components, *shared]
        self.register_to_config(**dict.fromkeys(shared, (None, None)))
        student_class = type(self.student).__name__
        if getattr(diffusers, student_class, None) is type(self.student):
            # ["diffusers", "StableDiffusionPipeline"] rather than ["stable_diffusion", ...]: diffusers then checks
            # the student given back to `from_pretrained` instead of warning that it cannot
            self.register_to_config(student=("diffusers", student_class))
        try:
            super().save_pretrained(
                save_directory, safe_serialization=safe_serialization, variant=variant,
                max_shard_size=max_shard_size, push_to_hub=push_to_hub, **kwargs,
            )  # fmt: skip
        finally:
            del self._optional_components
            self.register_to_config(**entries)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> AdaptiveCollabPipeline:
        r"""
        Loads the pipeline from a directory or a Hub id written by `save_pretrained` (safetensors only). Accepts
        `DiffusionPipeline.from_pretrained`'s arguments (`torch_dtype`, `variant`, ...), module overrides, and:

        Args:
            oracle (`Oracle`, *optional*): the oracle (it is not saved with the pipeline).
            student (`DiffusionPipeline`, *optional*): a student to use instead of the saved one.
        """
        if kwargs.get("use_safetensors") is False:
            raise ValueError("`use_safetensors` must be True (or left unset): weights load from safetensors only.")
        name = str(pretrained_model_name_or_path)
        folder = name if os.path.isdir(name) else cls.download(name, **kwargs)
        model_index = cls.load_config(folder)
        student = kwargs.pop("student", None)
        if student is None:
            library, class_name = model_index["student"]
            student_kwargs = {
                key: kwargs[key] for key in ("dtype", "torch_dtype", "variant", "low_cpu_mem_usage") if key in kwargs
            }
            student = _load_class(library, class_name).from_pretrained(
                os.path.join(folder, "student"), use_safetensors=True, **student_kwargs
            )
        for module_name in _SHAREABLE_MODULES:
            if model_index.get(module_name, [None])[0] is None and kwargs.get(module_name) is None:
                kwargs[module_name] = getattr(student, module_name)
        pipe = super().from_pretrained(folder, student=student, **kwargs)
        pipe.register_to_config(_name_or_path=name)

        calibration_path = os.path.join(folder, CALIBRATION_NAME)
        if os.path.isfile(calibration_path):
            with open(calibration_path, encoding="utf-8") as file:
                pipe.calibration = json.load(file)
            calibrated_with = pipe.calibration.get("oracle")
            if pipe.oracle is not None and calibrated_with not in (None, type(pipe.oracle).__name__):
                logger.warning(
                    f"The percentiles were calibrated with a {calibrated_with} oracle, but a "
                    f"{type(pipe.oracle).__name__} was given: percentile thresholds may not mean what they say."
                )
        return pipe

    def to(self, *args, **kwargs):
        r"""`DiffusionPipeline.to`, applied to the nested student pipeline too."""
        super().to(*args, **kwargs)
        self.student.to(*args, **kwargs)
        return self

    def set_progress_bar_config(self, **kwargs):
        r"""Sets the progress bar of this pipeline, of the student and of the teacher calls."""
        super().set_progress_bar_config(**kwargs)
        self.student.set_progress_bar_config(**kwargs)

    # ---------------------------------------------------------------- calibration and thresholds

    @torch.no_grad()
    def calibrate(
        self,
        prompts: list[str],
        batch_size: int = 8,
        num_images_per_prompt: int = 1,
        negative_prompt: str | None = None,
        generator: torch.Generator | None = None,
        student_steps: int | None = None,
        nasa_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        student_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        r"""
        Scores the student's samples on calibration prompts and stores the percentiles k = 0, 1, ..., 100 of the scores
        (`numpy.percentile`, linear interpolation) in `self.calibration`; they are saved with the pipeline.

        Args:
            prompts (`list[str]`): the calibration prompts (use prompts like the ones you will generate).
            batch_size (`int`, defaults to 8): prompts per student call.
            num_images_per_prompt (`int`, defaults to 1): samples per prompt.
            negative_prompt (`str`, *optional*): a negative prompt for every sample (through NASA for a
                `OneStepPipeline`), as you will call the pipeline.
            generator (`torch.Generator`, *optional*): one generator, used across the batches.
            student_steps, nasa_scale, height, width, student_kwargs: as in `__call__`.

        Returns:
            `torch.Tensor`: the `(len(prompts) * num_images_per_prompt,)` scores.
        """
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("`prompts` must be a non-empty list of strings.")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"`batch_size` must be an integer >= 1, got {batch_size}.")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise ValueError(
                f"`negative_prompt` must be a `str` (used for every sample), got {type(negative_prompt)}."
            )
        if isinstance(generator, list):
            raise ValueError("`generator` must be a single `torch.Generator` (it is used across the batches).")
        self._check_common(
            num_images_per_prompt, height, width, student_steps, nasa_scale, student_kwargs, None, generator, None,
            len(prompts),
        )  # fmt: skip

        scores = []
        for start in range(0, len(prompts), batch_size):
            batch = list(prompts[start : start + batch_size])
            _, _, images, _ = self._run_student(
                batch, negative_prompt, num_images_per_prompt, generator, None, height, width, student_steps,
                nasa_scale, student_kwargs,
            )  # fmt: skip
            scores.append(self._score(images, [p for p in batch for _ in range(num_images_per_prompt)]))
        scores = torch.cat(scores)
        finite = scores[torch.isfinite(scores)]
        if finite.numel() == 0:
            raise ValueError("The oracle returned no finite score on the calibration samples: cannot calibrate.")
        if finite.numel() < scores.numel():
            logger.warning(
                f"{scores.numel() - finite.numel()} non-finite oracle scores are left out of the calibration."
            )
        percentiles = np.percentile(finite.double().numpy(), np.arange(101))
        self.calibration = {
            "percentiles": [float(v) for v in percentiles],
            "num_samples": int(finite.numel()),
            "oracle": type(self.oracle).__name__,
        }
        return scores

    def get_threshold(self, percentile: float) -> float:
        r"""
        The oracle threshold `tau` for `percentile` in [0, 100]: the calibrated percentile, linearly interpolated
        between the stored integer percentiles; `-inf` for 0 (keep all) and `+inf` for 100 (refine all).
        """
        if self.calibration is None:
            raise ValueError(
                "`percentile` needs a calibration: call `pipe.calibrate(prompts)` first (or load a calibrated "
                "pipeline), or pass an explicit `threshold`."
            )
        if not _is_real(percentile) or not 0 <= percentile <= 100:
            raise ValueError(f"`percentile` must be a number in [0, 100], got {percentile}.")
        if percentile == 0:
            return -math.inf
        if percentile == 100:
            return math.inf
        return float(np.interp(percentile, np.arange(101), self.calibration["percentiles"]))

    # ---------------------------------------------------------------- generation

    def _check_common(
        self, num_images_per_prompt, height, width, student_steps, nasa_scale, student_kwargs, teacher_kwargs,
        generator, latents, batch_size,
    ):  # fmt: skip
        r"""Validates the arguments shared by `__call__` and `calibrate`; raises before any work."""
        if self.oracle is None:
            raise ValueError(
                "This pipeline has no oracle: pass `oracle=` to the constructor or to `from_pretrained`, or set "
                "`pipe.oracle` (the oracle is not saved with the pipeline)."
            )
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be an integer >= 1, got {num_images_per_prompt}.")
        for name, size in (("height", height), ("width", width)):
            if size is not None and (not isinstance(size, int) or size <= 0 or size % 8):
                raise ValueError(f"`{name}` must be a positive multiple of 8, got {size}.")
        if student_steps is not None and (not isinstance(student_steps, int) or student_steps < 1):
            raise ValueError(
                f"`student_steps` must be an integer >= 1 or None (the student's default), got {student_steps}."
            )
        if nasa_scale is not None and "nasa_scale" not in inspect.signature(self.student.__call__).parameters:
            raise ValueError(
                f"`nasa_scale` is for a `OneStepPipeline` student; {type(self.student).__name__} has no NASA."
            )
        for name, extra, reserved in (
            ("student_kwargs", student_kwargs, _STUDENT_RESERVED),
            ("teacher_kwargs", teacher_kwargs, _TEACHER_RESERVED),
        ):
            if extra is not None and not isinstance(extra, dict):
                raise ValueError(f"`{name}` must be a dict or None, got {type(extra)}.")
            clash = sorted(set(extra or {}) & set(reserved))
            if clash:
                raise ValueError(f"`{name}` must not set {clash}: the pipeline sets {list(reserved)} itself.")
        total = batch_size * num_images_per_prompt
        if isinstance(generator, list) and len(generator) != total:
            raise ValueError(f"`generator` is a list of {len(generator)}; expected {total} (one per image) or one.")
        if latents is not None and (not torch.is_tensor(latents) or latents.ndim != 4 or latents.shape[0] != total):
            shape = tuple(latents.shape) if torch.is_tensor(latents) else type(latents)
            raise ValueError(f"`latents` must be a (batch, C, h, w) tensor with batch {total}, got {shape}.")

    def check_inputs(
        self, prompt, negative_prompt, percentile, threshold, strategy, refine_strength, teacher_steps,
        teacher_guidance_scale, student_steps, nasa_scale, height, width, num_images_per_prompt, generator, latents,
        output_type, student_kwargs, teacher_kwargs,
    ) -> int:  # fmt: skip
        r"""Validates every argument before any work; returns the prompt batch size."""
        if prompt is None or not (
            isinstance(prompt, str)
            or (isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt))
        ):
            raise ValueError(
                f"`prompt` must be a `str` or a non-empty `list[str]` (the oracle reads it), got {prompt!r}."
            )
        batch_size = 1 if isinstance(prompt, str) else len(prompt)
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            if not isinstance(negative_prompt, list) or not all(isinstance(p, str) for p in negative_prompt):
                raise ValueError(f"`negative_prompt` must be a `str` or a `list[str]`, got {type(negative_prompt)}.")
            if len(negative_prompt) != batch_size:
                raise ValueError(
                    f"`negative_prompt` has {len(negative_prompt)} entries but `prompt` has {batch_size}: pass one "
                    "string for all prompts or one negative per prompt."
                )
        if percentile is not None and (not _is_real(percentile) or not 0 <= percentile <= 100):
            raise ValueError(f"`percentile` must be a number in [0, 100], got {percentile}.")
        if percentile is not None and threshold is not None:
            raise ValueError("Pass at most one of `percentile` or `threshold` (got both).")
        if threshold is not None and (not _is_real(threshold) or math.isnan(threshold)):
            raise ValueError(f"`threshold` must be a number (an oracle score), got {threshold}.")
        if threshold is None and self.calibration is None:
            raise ValueError(
                "This pipeline is not calibrated: pass an explicit `threshold` (an oracle score), or call "
                "`pipe.calibrate(prompts)` first to use `percentile`."
                if percentile is None
                else "`percentile` needs a calibration: call `pipe.calibrate(prompts)` first (or load a calibrated "
                "pipeline), or pass an explicit `threshold`."
            )
        if strategy not in STRATEGIES:
            raise ValueError(f"`strategy` must be one of {STRATEGIES}, got {strategy!r}.")
        if not _is_real(refine_strength) or not 0 < refine_strength <= 1:
            raise ValueError(f"`refine_strength` (SDEdit sigma) must be in (0, 1], got {refine_strength}.")
        if not isinstance(teacher_steps, int) or isinstance(teacher_steps, bool) or teacher_steps < 1:
            raise ValueError(f"`teacher_steps` must be an integer >= 1, got {teacher_steps}.")
        num_train_timesteps = self.scheduler.config.num_train_timesteps
        if strategy == "refine" and _img2img_steps(teacher_steps, refine_strength) > num_train_timesteps:
            raise ValueError(
                f"`teacher_steps`={teacher_steps} at `refine_strength`={refine_strength} needs "
                f"{_img2img_steps(teacher_steps, refine_strength)} img2img steps, more than the teacher scheduler's "
                f"{num_train_timesteps}: raise `refine_strength` or lower `teacher_steps`."
            )
        if (
            not _is_real(teacher_guidance_scale)
            or not math.isfinite(teacher_guidance_scale)
            or teacher_guidance_scale < 1
        ):
            raise ValueError(
                "`teacher_guidance_scale` must be a finite number >= 1 (1 disables CFG), "
                f"got {teacher_guidance_scale}."
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        self._check_common(
            num_images_per_prompt, height, width, student_steps, nasa_scale, student_kwargs, teacher_kwargs, generator,
            latents, batch_size,
        )  # fmt: skip
        return batch_size

    def _run_student(
        self, prompts, negative_prompt, num_images_per_prompt, generator, latents, height, width, student_steps,
        nasa_scale, student_kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:  # fmt: skip
        """Initial noise, the student's latents, its decoded images in [-1, 1] and its NFE per image."""
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        total = len(prompts) * num_images_per_prompt
        device = self._execution_device
        encoder = getattr(self.student, "text_encoder", None)
        dtype = encoder.dtype if encoder is not None else _denoiser(self.student).dtype
        channels = _denoiser(self.student).config.in_channels
        shape = (total, channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"`latents` has shape {tuple(latents.shape)}; expected {shape}.")
        latents = latents.to(device=device, dtype=dtype)

        call = {"prompt": prompts, "num_images_per_prompt": num_images_per_prompt, "generator": generator,
                "latents": latents, "height": height, "width": width, "output_type": "latent",
                "return_dict": True}  # fmt: skip
        if negative_prompt is not None:
            call["negative_prompt"] = negative_prompt
        if student_steps is not None:
            call["num_inference_steps"] = student_steps
        if nasa_scale is not None:
            call["nasa_scale"] = nasa_scale
        with _count_evaluations(_denoiser(self.student)) as counter:
            student_latents = self.student(**call, **(student_kwargs or {})).images
        student_images = _decode(self.student.vae, student_latents)
        return latents, student_latents, student_images, counter.per_image(total)

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The oracle's `(batch,)` float32 scores of `[-1, 1]` images, computed batched under `no_grad`."""
        with torch.no_grad():
            scores = self.oracle(self.image_processor.postprocess(images, output_type="pt"), prompts)
        return check_scores(scores, len(prompts))

    @contextmanager
    def _teacher_weights(self) -> Iterator[None]:
        """Disables the student's LoRA adapters while the teacher runs, where both use the same UNet object."""
        shared = self.unet is _denoiser(self.student) and getattr(self.unet, "_hf_peft_config_loaded", False)
        if shared:
            self.unet.disable_adapters()
        try:
            yield
        finally:
            if shared:
                self.unet.enable_adapters()

    def _teacher(self, pipeline_class: type[DiffusionPipeline]) -> DiffusionPipeline:
        """A diffusers teacher pipeline built on this pipeline's module objects (nothing is copied)."""
        teacher = pipeline_class(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=self.scheduler, safety_checker=None, feature_extractor=None, image_encoder=None,
            requires_safety_checker=False,
        )  # fmt: skip
        teacher.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
        return teacher

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        percentile: float | None = None,
        threshold: float | None = None,
        strategy: str = "refine",
        refine_strength: float = 0.7,
        teacher_steps: int = 12,
        teacher_guidance_scale: float = 8.0,
        student_steps: int | None = None,
        nasa_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        student_kwargs: dict[str, Any] | None = None,
        teacher_kwargs: dict[str, Any] | None = None,
    ) -> AdaptiveCollabPipelineOutput | tuple:
        r"""
        The student generates every image; the oracle scores them; the images with `score < tau` go to the teacher.

        Args:
            prompt (`str` or `list[str]`): what to generate (text is needed: the oracle reads it).
            negative_prompt (`str` or `list[str]`, *optional*): given to the student (through NASA for a
                `OneStepPipeline`) and to the teacher as the unconditional branch of its CFG.
            percentile (`float`, *optional*): k in [0, 100]: `tau` is the calibrated k-th percentile of the student's
                scores, so about k% of images like the calibration ones go to the teacher; 0 keeps all, 100 refines
                all. Defaults to 50 on a calibrated pipeline. Exclusive with `threshold`.
            threshold (`float`, *optional*): an explicit `tau` in oracle-score units; an image is kept iff
                `score >= threshold`. Needs no calibration.
            strategy (`str`, defaults to `"refine"`): `"refine"` (SDEdit from the student's image) or `"regenerate"`
                (the teacher from the student's initial noise).
            refine_strength (`float`, defaults to 0.7): SDEdit strength `sigma` in (0, 1] (0.7 in the authors'
                LCM-SDXL + SDXL-Base setting, 0.3 for SDXL-Turbo + Refiner).
            teacher_steps (`int`, defaults to 12): teacher steps that actually run per refined image (for
                `"refine"`, img2img gets `num_inference_steps` such that `int(num_inference_steps * sigma)` is this).
            teacher_guidance_scale (`float`, defaults to 8.0): the teacher's CFG scale (> 1 doubles its evaluations).
            student_steps (`int`, *optional*): the student's `num_inference_steps`; defaults to the student's own.
            nasa_scale (`float`, *optional*): NASA scale for a `OneStepPipeline` student; defaults to its config.
            height, width (`int`, *optional*): image size; defaults to the teacher UNet's sample size times the VAE
                factor.
            num_images_per_prompt (`int`, defaults to 1): images per prompt.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): one, or one per image (the teacher
                gets the refined images' own generators).
            latents (`torch.Tensor`, *optional*): the initial noise `(batch, C, h, w)` of the student (and of the
                teacher under `"regenerate"`).
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"`, `"pt"` or `"latent"`.
            return_dict (`bool`, defaults to True): return an `AdaptiveCollabPipelineOutput` instead of a tuple.
            student_kwargs (`dict`, *optional*): other arguments of the student's call (e.g. `guidance_scale` of an
                LCM pipeline).
            teacher_kwargs (`dict`, *optional*): other arguments of the teacher's calls (e.g. `guidance_rescale`).

        Returns:
            `AdaptiveCollabPipelineOutput`, or the tuple `(images, scores, refined, nfe, average_nfe, threshold)`.
        """
        # 1. Check inputs (raises before any work) and resolve the threshold
        batch_size = self.check_inputs(
            prompt, negative_prompt, percentile, threshold, strategy, refine_strength, teacher_steps,
            teacher_guidance_scale, student_steps, nasa_scale, height, width, num_images_per_prompt, generator,
            latents, output_type, student_kwargs, teacher_kwargs,
        )  # fmt: skip
        if threshold is None:
            percentile = 50 if percentile is None else percentile
            threshold = self.get_threshold(percentile)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        total = batch_size * num_images_per_prompt
        image_prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        if isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt] * batch_size
        image_negatives = None
        if negative_prompt is not None:
            image_negatives = [n for n in negative_prompt for _ in range(num_images_per_prompt)]

        # 2. The student drafts every image from the initial noise z
        latents, student_latents, images, student_nfe = self._run_student(
            prompts, negative_prompt, num_images_per_prompt, generator, latents, height, width, student_steps,
            nasa_scale, student_kwargs,
        )  # fmt: skip

        # 3. The oracle scores the student's images; keep iff score >= tau (k = 0 keeps all, k = 100 refines all)
        scores = self._score(images, image_prompts)
        if percentile == 0:
            refined = torch.zeros(total, dtype=torch.bool)
        elif percentile == 100:
            refined = torch.ones(total, dtype=torch.bool)
        else:
            refined = ~(scores >= threshold)  # a NaN score is not kept
        index = refined.nonzero().flatten().tolist()

        # 4. The teacher improves the rejected images, batched: SDEdit refinement or regeneration from z
        teacher_nfe = 0
        final_latents = student_latents
        if index:
            call = {
                "prompt": [image_prompts[i] for i in index],
                "negative_prompt": None if image_negatives is None else [image_negatives[i] for i in index],
                "generator": [generator[i] for i in index] if isinstance(generator, list) else generator,
                "guidance_scale": teacher_guidance_scale,
                "output_type": "latent",
                **(teacher_kwargs or {}),
            }
            if strategy == "refine":
                teacher = self._teacher(StableDiffusionImg2ImgPipeline)
                # the student's latents are the SDEdit start where both share the VAE (no decode-encode round trip)
                start = (
                    student_latents if self.student.vae is self.vae else self.image_processor.postprocess(images, "pt")
                )
                call.update(image=start[index], strength=refine_strength,
                            num_inference_steps=_img2img_steps(teacher_steps, refine_strength))  # fmt: skip
            else:
                teacher = self._teacher(StableDiffusionPipeline)
                height = height or self.unet.config.sample_size * self.vae_scale_factor
                width = width or self.unet.config.sample_size * self.vae_scale_factor
                call.update(latents=latents[index], num_inference_steps=teacher_steps, height=height, width=width)
            with self._teacher_weights(), _count_evaluations(self.unet) as counter:
                teacher_latents = teacher(**call).images
            teacher_nfe = counter.per_image(len(index))
            final_latents = student_latents.clone()
            final_latents[index] = teacher_latents.to(final_latents.dtype)

        # 5. Decode: the kept images are the student's own decoded images, bit for bit
        if output_type == "latent":
            output_images = final_latents
        else:
            if index:
                images = images.clone()
                images[index] = _decode(self.vae, teacher_latents).to(images.dtype)
            output_images = self.image_processor.postprocess(images, output_type=output_type)
        self.maybe_free_model_hooks()

        # 6. The price: student NFE for every image, plus the teacher's for the refined ones
        nfe = [student_nfe + (teacher_nfe if r else 0) for r in refined.tolist()]
        output = AdaptiveCollabPipelineOutput(
            images=output_images, scores=scores, refined=refined, nfe=nfe, average_nfe=sum(nfe) / total,
            threshold=float(threshold),
        )  # fmt: skip
        return output if return_dict else output.to_tuple()
