"""`AdaptiveCollabPipeline`: the student drafts, an oracle judges, the teacher refines only where needed.

Adaptive teacher-student collaboration (Starodubcev et al., "Your Student is Better Than Expected: Adaptive
Teacher-Student Collaboration for Text-Conditional Diffusion Models", CVPR 2024, Sec. 4):

1. the student generates `X_s` in one (or a few) steps;
2. an oracle scores every `(prompt, X_s)` pair; the threshold `tau` is the k-th percentile of the oracle's scores on
   the student's samples over a calibration prompt set (`calibrate`, `OracleCalibration`);
3. an image with `score >= tau` is kept; the others go to the teacher, batched together: **refinement** (SDEdit: noise
   `X_s` to strength `sigma` and run the teacher img2img for about `teacher_steps` steps, with CFG) or
   **regeneration** (the teacher from the same initial noise);
4. the cost is `N_student + (share refined) * N_teacher` network evaluations per image on average, reported per call.

The teacher is any diffusers text-to-image pipeline: it regenerates itself, and refines through the img2img pipeline
diffusers derives from it (`AutoPipelineForImage2Image.from_pipe`, the same module objects, no second copy).
"""

from __future__ import annotations

import inspect
import math
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import huggingface_hub
import numpy as np
import PIL.Image
import torch
from diffusers import AutoPipelineForImage2Image, DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor

from .calibration import CALIBRATION_NAME, OracleCalibration, check_percentile
from .loading import OneStepLoadingMixin, load_pipeline
from .oracles import Oracle, check_scores
from .pipeline_utils import (
    check_generator,
    check_image_size,
    check_latents,
    check_num_images_per_prompt,
    check_output_type,
    check_prompts,
    decode_latents,
    first_tensor,
    vae_scale_factor_of,
)


__all__ = ["AdaptiveCollabPipeline", "AdaptiveCollabPipelineOutput"]

logger = logging.get_logger(__name__)

STRATEGIES = ("refine", "regenerate")
# arguments the pipeline sets itself on the student and teacher calls
_STUDENT_RESERVED = ("prompt", "negative_prompt", "num_images_per_prompt", "generator", "latents", "height", "width",
                     "output_type", "return_dict", "num_inference_steps", "nasa_scale")  # fmt: skip
_TEACHER_RESERVED = ("prompt", "negative_prompt", "image", "strength", "num_inference_steps", "guidance_scale",
                     "num_images_per_prompt", "generator", "latents", "height", "width", "output_type",
                     "return_dict")  # fmt: skip
# `from_pretrained` arguments passed on to the student's and the teacher's loading, and those of the Hub download
_LOAD_KWARGS = ("dtype", "torch_dtype", "variant", "low_cpu_mem_usage")
_HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "use_safetensors")

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
            Network evaluations spent on each image: the student's denoiser evaluations plus, for refined images, the
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


@contextmanager
def _count_evaluations(denoiser: torch.nn.Module) -> Iterator[list[int]]:
    """Counts the samples a denoiser processes: a CFG step feeds `2 * batch` samples, two evaluations per image."""
    samples = [0]

    def hook(module, args, kwargs):
        samples[0] += (args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))).shape[0]

    handle = denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield samples
    finally:
        handle.remove()


def _denoiser(pipeline) -> torch.nn.Module | None:
    """A pipeline's denoising network: its `unet`, or its `transformer`."""
    unet = getattr(pipeline, "unet", None)
    return unet if unet is not None else getattr(pipeline, "transformer", None)


def _img2img_steps(teacher_steps: int, strength: float) -> int:
    """The smallest `num_inference_steps` for which img2img at `strength` runs `teacher_steps` steps."""
    # img2img runs int(num_inference_steps * strength) steps; that count grows by at most 1 per step when
    # strength <= 1, so the smallest sufficient value runs exactly `teacher_steps`
    steps = max(teacher_steps, math.ceil(teacher_steps / strength) - 1)
    while int(steps * strength) < teacher_steps:
        steps += 1
    return steps


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_extra_kwargs(extra, *, name: str, reserved: tuple[str, ...]) -> None:
    if extra is not None and not isinstance(extra, dict):
        raise ValueError(f"`{name}` must be a dict or None, got {type(extra)}.")
    clash = sorted(set(extra or {}) & set(reserved))
    if clash:
        raise ValueError(f"`{name}` must not set {clash}: the pipeline sets {list(reserved)} itself.")


def _check_pipeline(pipeline, name: str) -> None:
    if (
        not isinstance(pipeline, DiffusionPipeline)
        or _denoiser(pipeline) is None
        or getattr(pipeline, "vae", None) is None
    ):
        raise ValueError(
            f"`{name}` must be a diffusers text-to-image pipeline with a `vae` and a `unet` or `transformer` (a "
            f"`StableDiffusionPipeline`, a `OneStepPipeline`, an LCM pipeline, ...), got {type(pipeline)}."
        )


class AdaptiveCollabPipeline(OneStepLoadingMixin, DiffusionPipeline):
    r"""
    Adaptive teacher-student collaboration (Starodubcev et al., CVPR 2024): a one-step (or few-step) student drafts
    every image, an oracle scores it, and only the images scoring below a threshold go to the teacher, batched
    together, for SDEdit refinement or regeneration. A user pays the student's price for most images and the
    teacher's only for the share the oracle rejects; every call reports that price (`nfe`, `average_nfe`).

    **Decision rule.** An image is kept iff `score >= tau` (a NaN score is never kept). With `percentile=k`, `tau` is
    the k-th percentile of the calibration scores (`pipe.calibration`, an `OracleCalibration`), except that `k = 0`
    keeps every image (the student alone) and `k = 100` refines every image, whatever the scores.

    **NFE** counts denoiser evaluations per image, as `OneStepPipelineOutput.nfe` does: a CFG step counts two.
    Refinement at strength `sigma` runs `teacher_steps` teacher steps (img2img is asked for the smallest
    `num_inference_steps` with `int(num_inference_steps * sigma) == teacher_steps`); what actually ran is counted.
    The paper counts steps: halve the teacher's share under CFG to compare.

    **Saving.** `save_pretrained` writes `student/` and `teacher/` (each pipeline's own `save_pretrained`, safetensors),
    `calibration.json` once calibrated, and `model_index.json`. Modules the teacher shares with the student (the same
    objects, e.g. the VAE, text encoder and tokenizer of `OneStepPipeline.from_teacher(teacher, ...)`) are written once,
    in `student/`, listed under `_shared_with_student`, and shared again by `from_pretrained`. The oracle is not saved
    (a Python callable cannot be): pass it again, `AdaptiveCollabPipeline.from_pretrained(path, oracle=...)`, or set
    `pipe.oracle`.

    Args:
        student (`DiffusionPipeline`):
            The student: a `OneStepPipeline`, or any diffusers text-to-image pipeline that accepts `latents` and
            `output_type="latent"` (e.g. an LCM pipeline) and whose latents live in the teacher's latent space.
        teacher (`DiffusionPipeline`):
            The teacher, a diffusers text-to-image pipeline with an img2img sibling for `"refine"`
            (`AutoPipelineForImage2Image.from_pipe(teacher)`: Stable Diffusion, SDXL, PixArt, ...). If its denoiser is
            the student's, carrying the student as a LoRA adapter, the adapters are disabled while the teacher runs.
        oracle (`Oracle`, *optional*):
            `oracle(images, prompts) -> (batch,)` scores, higher is better (see `diffusers_onestep.pipelines.oracles`).
            Optional only so that it can be given after loading; generating and calibrating need one.
    """

    _optional_components = ["oracle"]

    def __init__(
        self, student: DiffusionPipeline, teacher: DiffusionPipeline, oracle: Oracle | Callable | None = None
    ):
        super().__init__()
        _check_pipeline(student, "student")
        _check_pipeline(teacher, "teacher")
        if oracle is not None and not callable(oracle):
            raise ValueError(f"`oracle` must be callable as oracle(images, prompts) -> scores, got {type(oracle)}.")
        if _denoiser(teacher) is _denoiser(student) and not getattr(_denoiser(teacher), "peft_config", None):
            logger.warning(
                "The student and the teacher are the same denoiser without a LoRA adapter: the teacher would refine "
                "with the student's weights."
            )
        # the oracle is an optional component recorded as (None, None): a callable cannot be saved
        self.register_modules(student=student, teacher=teacher, oracle=None)
        self.oracle = oracle
        self.vae_scale_factor = vae_scale_factor_of(teacher.vae)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.calibration: OracleCalibration | None = None
        self._progress_bar_kwargs: dict = {}

    @classmethod
    def from_pipelines(
        cls, student: DiffusionPipeline, teacher: DiffusionPipeline, *, oracle: Oracle | Callable | None = None
    ) -> AdaptiveCollabPipeline:
        r"""
        Builds the pipeline from a student pipeline and a teacher text-to-image pipeline, both used as they are (their
        modules are shared, never copied).

        Args:
            student (`DiffusionPipeline`): e.g. `OneStepPipeline.from_teacher(teacher, unet=...)`.
            teacher (`DiffusionPipeline`): e.g. a `StableDiffusionPipeline`.
            oracle (`Oracle`, *optional*): the judge.
        """
        return cls(student=student, teacher=teacher, oracle=oracle)

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
        Writes `student/` and `teacher/` (each pipeline's `save_pretrained`, safetensors), `calibration.json` (once
        calibrated) and `model_index.json`. The teacher's modules that are the student's own objects are written once,
        in `student/`. With `push_to_hub=True` the directory is then uploaded (`repo_id`, `token`, `private`,
        `commit_message`, `create_pr` as in `DiffusionPipeline.save_pretrained`). The oracle is not saved.
        """
        if not safe_serialization:
            raise ValueError("`safe_serialization` must be True (or left unset): weights are saved as safetensors.")
        options = {"safe_serialization": True, "variant": variant, "max_shard_size": max_shard_size}
        self.student.save_pretrained(os.path.join(save_directory, "student"), **options)
        teacher_directory = os.path.join(save_directory, "teacher")
        self.teacher.save_pretrained(teacher_directory, **options)
        shared = sorted(
            name for name, module in self.teacher.components.items()
            if module is not None and getattr(self.student, name, None) is module
        )  # fmt: skip
        for name in shared:
            shutil.rmtree(os.path.join(teacher_directory, name), ignore_errors=True)
        self.register_to_config(_shared_with_student=shared)
        self.save_config(save_directory)
        if self.calibration is not None:
            self.calibration.save(save_directory)
        elif os.path.exists(os.path.join(save_directory, CALIBRATION_NAME)):
            os.remove(os.path.join(save_directory, CALIBRATION_NAME))  # a stale calibration must not come back

        if push_to_hub:
            token = kwargs.get("token")
            repo_id = kwargs.get("repo_id", os.path.basename(os.path.normpath(save_directory)))
            repo_id = huggingface_hub.create_repo(
                repo_id, private=kwargs.get("private"), token=token, exist_ok=True
            ).repo_id
            huggingface_hub.upload_folder(
                repo_id=repo_id, folder_path=save_directory, token=token, commit_message=kwargs.get("commit_message"),
                create_pr=kwargs.get("create_pr", False),
            )  # fmt: skip

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        oracle: Oracle | Callable | None = None,
        student: DiffusionPipeline | None = None,
        teacher: DiffusionPipeline | None = None,
        **kwargs,
    ) -> AdaptiveCollabPipeline:
        r"""
        Loads the pipeline from a directory or a Hub id written by `save_pretrained` (safetensors only).

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): the directory or Hub id.
            oracle (`Oracle`, *optional*): the oracle (it is not saved with the pipeline).
            student, teacher (`DiffusionPipeline`, *optional*): pipelines to use instead of the saved ones.
            kwargs: `dtype` / `torch_dtype`, `variant`, `low_cpu_mem_usage` (for the student's and the teacher's
                `DiffusionPipeline.from_pretrained`) and the Hub download's `revision`, `cache_dir`, `token`,
                `local_files_only`, `force_download`.
        """
        unknown = sorted(set(kwargs) - {*_LOAD_KWARGS, *_HUB_KWARGS})
        if unknown:
            raise ValueError(
                f"`from_pretrained` got unknown arguments {unknown}; allowed: {_LOAD_KWARGS + _HUB_KWARGS}."
            )
        if kwargs.get("use_safetensors") is False:
            raise ValueError("`use_safetensors` must be True (or left unset): weights load from safetensors only.")
        name = str(pretrained_model_name_or_path)
        folder = name if os.path.isdir(name) else cls.download(name, **kwargs)
        model_index = cls.load_config(folder)
        if model_index.get("_class_name") != cls.__name__ or not os.path.isdir(os.path.join(folder, "teacher")):
            raise ValueError(
                f"`pretrained_model_name_or_path`: {name!r} is not an `AdaptiveCollabPipeline` directory (with "
                "`student/` and `teacher/`) written by `save_pretrained`."
            )
        load_kwargs = {key: kwargs[key] for key in _LOAD_KWARGS if key in kwargs}
        if student is None:
            student = load_pipeline(os.path.join(folder, "student"), "student", **load_kwargs)
        if teacher is None:
            shared = {module: getattr(student, module) for module in model_index.get("_shared_with_student", [])}
            teacher = load_pipeline(os.path.join(folder, "teacher"), "teacher", **load_kwargs, **shared)
        pipe = cls(student=student, teacher=teacher, oracle=oracle)
        pipe.register_to_config(_name_or_path=name)
        pipe.calibration = OracleCalibration.load(folder)
        if pipe.calibration is not None:
            pipe.calibration.check_oracle(oracle)
        return pipe

    # ---------------------------------------------------------------- devices and progress bars

    @property
    def _execution_device(self) -> torch.device:
        r"""Where the student runs (the noise is drawn there)."""
        return self.student._execution_device

    @property
    def device(self) -> torch.device:
        return self.student.device

    def to(self, *args, **kwargs):
        r"""`DiffusionPipeline.to`, applied to the student and the teacher (and to the oracle where it is a module)."""
        super().to(*args, **kwargs)
        self.student.to(*args, **kwargs)
        self.teacher.to(*args, **kwargs)
        return self

    def set_progress_bar_config(self, **kwargs):
        r"""Sets the progress bar of this pipeline, of the student and of the teacher calls."""
        super().set_progress_bar_config(**kwargs)
        self.student.set_progress_bar_config(**kwargs)
        self.teacher.set_progress_bar_config(**kwargs)
        self._progress_bar_kwargs = kwargs

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
        Scores the student's samples on calibration prompts and stores their percentiles k = 0, 1, ..., 100 as
        `self.calibration` (an `OracleCalibration`, saved with the pipeline).

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
        self._check_student_inputs(
            batch_size=len(prompts), num_images_per_prompt=num_images_per_prompt, height=height, width=width,
            student_steps=student_steps, nasa_scale=nasa_scale, student_kwargs=student_kwargs, generator=generator,
            latents=None,
        )  # fmt: skip

        scores = []
        for start in range(0, len(prompts), batch_size):
            batch = list(prompts[start : start + batch_size])
            _, _, images, _ = self._run_student(
                prompts=batch, negative_prompt=negative_prompt, num_images_per_prompt=num_images_per_prompt,
                generator=generator, latents=None, height=height, width=width, student_steps=student_steps,
                nasa_scale=nasa_scale, student_kwargs=student_kwargs,
            )  # fmt: skip
            scores.append(self._score(images, [p for p in batch for _ in range(num_images_per_prompt)]))
        scores = torch.cat(scores)
        self.calibration = OracleCalibration.from_scores(scores, oracle=type(self.oracle).__name__)
        return scores

    def get_threshold(self, percentile: float) -> float:
        r"""
        The oracle threshold `tau` for `percentile` in [0, 100] (`OracleCalibration.threshold`): the calibrated
        percentile, linearly interpolated; `-inf` for 0 (keep all) and `+inf` for 100 (refine all).
        """
        if self.calibration is None:
            raise ValueError(
                "`percentile` needs a calibration: call `pipe.calibrate(prompts)` first (or load a calibrated "
                "pipeline), or pass an explicit `threshold`."
            )
        return self.calibration.threshold(percentile)

    # ---------------------------------------------------------------- checks

    def _default_size(self) -> int:
        return _denoiser(self.teacher).config.sample_size * self.vae_scale_factor

    def _latents_shape(self, total: int, height: int | None, width: int | None) -> tuple[int, int, int, int]:
        height, width = height or self._default_size(), width or self._default_size()
        channels = _denoiser(self.student).config.in_channels
        return total, channels, height // self.vae_scale_factor, width // self.vae_scale_factor

    def _check_student_inputs(
        self, *, batch_size, num_images_per_prompt, height, width, student_steps, nasa_scale, student_kwargs,
        generator, latents,
    ) -> None:  # fmt: skip
        r"""Validates the arguments shared by `__call__` and `calibrate`; raises before any work."""
        if self.oracle is None:
            raise ValueError(
                "This pipeline has no oracle: pass `oracle=` to the constructor or to `from_pretrained`, or set "
                "`pipe.oracle` (the oracle is not saved with the pipeline)."
            )
        check_num_images_per_prompt(num_images_per_prompt)
        check_image_size(height=height, width=width, vae_scale_factor=self.vae_scale_factor)
        if student_steps is not None and (
            not isinstance(student_steps, int) or isinstance(student_steps, bool) or student_steps < 1
        ):
            raise ValueError(
                f"`student_steps` must be an integer >= 1 or None (the student's default), got {student_steps}."
            )
        if nasa_scale is not None and "nasa_scale" not in inspect.signature(self.student.__call__).parameters:
            raise ValueError(
                f"`nasa_scale` is for a `OneStepPipeline` student; {type(self.student).__name__} has no NASA."
            )
        _check_extra_kwargs(student_kwargs, name="student_kwargs", reserved=_STUDENT_RESERVED)
        total = batch_size * num_images_per_prompt
        check_generator(generator, total=total)
        check_latents(latents, shape=self._latents_shape(total, height, width))

    def check_inputs(
        self, *, prompt, negative_prompt, percentile, threshold, strategy, refine_strength, teacher_steps,
        teacher_guidance_scale, student_steps, nasa_scale, height, width, num_images_per_prompt, generator, latents,
        output_type, student_kwargs, teacher_kwargs,
    ) -> int:  # fmt: skip
        r"""Validates every argument before any work; returns the prompt batch size."""
        batch_size = check_prompts(prompt=prompt, negative_prompt=negative_prompt, text_required=True)
        if percentile is not None:
            check_percentile(percentile)
        if percentile is not None and threshold is not None:
            raise ValueError("Pass at most one of `percentile` or `threshold` (got both).")
        if threshold is not None and (not _is_real(threshold) or math.isnan(threshold)):
            raise ValueError(f"`threshold` must be a number (an oracle score), got {threshold}.")
        if threshold is None and percentile is None and self.calibration is None:
            raise ValueError(
                "This pipeline is not calibrated: pass an explicit `threshold` (an oracle score), or call "
                "`pipe.calibrate(prompts)` first to use `percentile`."
            )
        if threshold is None:
            self.get_threshold(50 if percentile is None else percentile)  # raises without a calibration
        if strategy not in STRATEGIES:
            raise ValueError(f"`strategy` must be one of {STRATEGIES}, got {strategy!r}.")
        if not _is_real(refine_strength) or not 0 < refine_strength <= 1:
            raise ValueError(f"`refine_strength` (SDEdit sigma) must be in (0, 1], got {refine_strength}.")
        if not isinstance(teacher_steps, int) or isinstance(teacher_steps, bool) or teacher_steps < 1:
            raise ValueError(f"`teacher_steps` must be an integer >= 1, got {teacher_steps}.")
        num_train_timesteps = self.teacher.scheduler.config.num_train_timesteps
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
                f"`teacher_guidance_scale` must be a finite number >= 1 (1 disables CFG), got {teacher_guidance_scale}."
            )
        check_output_type(output_type)
        _check_extra_kwargs(teacher_kwargs, name="teacher_kwargs", reserved=_TEACHER_RESERVED)
        self._check_student_inputs(
            batch_size=batch_size, num_images_per_prompt=num_images_per_prompt, height=height, width=width,
            student_steps=student_steps, nasa_scale=nasa_scale, student_kwargs=student_kwargs, generator=generator,
            latents=latents,
        )  # fmt: skip
        return batch_size

    # ---------------------------------------------------------------- the three players

    def _run_student(
        self, *, prompts, negative_prompt, num_images_per_prompt, generator, latents, height, width, student_steps,
        nasa_scale, student_kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:  # fmt: skip
        """Initial noise, the student's latents, its decoded images in [-1, 1] and its NFE per image."""
        height, width = height or self._default_size(), width or self._default_size()
        total = len(prompts) * num_images_per_prompt
        encoder = getattr(self.student, "text_encoder", None)
        dtype = first_tensor(encoder if encoder is not None else _denoiser(self.student)).dtype
        device = self._execution_device
        if latents is None:
            latents = randn_tensor(self._latents_shape(total, height, width), generator=generator, device=device,
                                   dtype=dtype)  # fmt: skip
        latents = latents.to(device=device, dtype=dtype)

        call = {"prompt": prompts, "num_images_per_prompt": num_images_per_prompt, "generator": generator,
                "latents": latents, "height": height, "width": width, "output_type": "latent",
                "return_dict": True}  # fmt: skip
        optional = {"negative_prompt": negative_prompt, "num_inference_steps": student_steps, "nasa_scale": nasa_scale}
        call.update({key: value for key, value in optional.items() if value is not None})
        with _count_evaluations(_denoiser(self.student)) as samples:
            student_latents = self.student(**call, **(student_kwargs or {})).images
        student_images = decode_latents(self.student.vae, student_latents)
        return latents, student_latents, student_images, samples[0] // total

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The oracle's `(batch,)` float32 scores of `[-1, 1]` images, computed batched under `no_grad`."""
        with torch.no_grad():
            scores = self.oracle(self.image_processor.postprocess(images, output_type="pt"), prompts)
        return check_scores(scores, len(prompts))

    def _teacher_pipeline(self, strategy: str) -> DiffusionPipeline:
        """The teacher itself (regeneration), or its diffusers img2img sibling on the same modules (refinement)."""
        if strategy == "regenerate":
            return self.teacher
        try:
            img2img = AutoPipelineForImage2Image.from_pipe(self.teacher)
        except ValueError as error:
            raise ValueError(
                f"`strategy='refine'` needs an image-to-image pipeline for the teacher, and diffusers has none for "
                f"{type(self.teacher).__name__} ({error}): use `strategy='regenerate'`."
            ) from error
        img2img.set_progress_bar_config(**self._progress_bar_kwargs)
        return img2img

    @contextmanager
    def _teacher_weights(self) -> Iterator[None]:
        """Disables the student's LoRA adapters while the teacher runs, where both use the same denoiser object."""
        denoiser = _denoiser(self.teacher)
        shared = denoiser is _denoiser(self.student) and getattr(denoiser, "peft_config", None)
        if shared:
            denoiser.disable_adapters()
        try:
            yield
        finally:
            if shared:
                denoiser.enable_adapters()

    # ---------------------------------------------------------------- generation

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
            height, width (`int`, *optional*): image size, positive multiples of the VAE factor; defaults to the
                teacher denoiser's sample size times the VAE factor.
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
        # 1. Check inputs (raises before any work), resolve the threshold and build the teacher's pipeline
        batch_size = self.check_inputs(
            prompt=prompt, negative_prompt=negative_prompt, percentile=percentile, threshold=threshold,
            strategy=strategy, refine_strength=refine_strength, teacher_steps=teacher_steps,
            teacher_guidance_scale=teacher_guidance_scale, student_steps=student_steps, nasa_scale=nasa_scale,
            height=height, width=width, num_images_per_prompt=num_images_per_prompt, generator=generator,
            latents=latents, output_type=output_type, student_kwargs=student_kwargs, teacher_kwargs=teacher_kwargs,
        )  # fmt: skip
        if threshold is None:
            percentile = 50 if percentile is None else percentile
            threshold = self.get_threshold(percentile)
        teacher = self._teacher_pipeline(strategy)
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
            prompts=prompts, negative_prompt=negative_prompt, num_images_per_prompt=num_images_per_prompt,
            generator=generator, latents=latents, height=height, width=width, student_steps=student_steps,
            nasa_scale=nasa_scale, student_kwargs=student_kwargs,
        )  # fmt: skip

        # 3. The oracle scores the student's images; keep iff score >= tau (k = 0 keeps all, k = 100 refines all)
        scores = self._score(images, image_prompts)
        if percentile in (0, 100):
            refined = torch.full((total,), percentile == 100, dtype=torch.bool)
        else:
            refined = ~(scores >= threshold)  # a NaN score is not kept
        index = refined.nonzero().flatten().tolist()

        # 4. The teacher improves the rejected images, batched: SDEdit refinement or regeneration from z
        teacher_nfe, final_latents = 0, student_latents
        if index:
            call = {
                "prompt": [image_prompts[i] for i in index],
                **({} if image_negatives is None else {"negative_prompt": [image_negatives[i] for i in index]}),
                "generator": [generator[i] for i in index] if isinstance(generator, list) else generator,
                "guidance_scale": teacher_guidance_scale,
                "output_type": "latent",
                **(teacher_kwargs or {}),
            }
            if strategy == "refine":
                # the student's latents are the SDEdit start where both share the VAE (no decode-encode round trip)
                shared_vae = self.student.vae is self.teacher.vae
                start = student_latents if shared_vae else self.image_processor.postprocess(images, output_type="pt")
                call.update(image=start[index], strength=refine_strength,
                            num_inference_steps=_img2img_steps(teacher_steps, refine_strength))  # fmt: skip
            else:
                call.update(latents=latents[index], num_inference_steps=teacher_steps,
                            height=height or self._default_size(), width=width or self._default_size())  # fmt: skip
            with self._teacher_weights(), _count_evaluations(_denoiser(self.teacher)) as samples:
                teacher_latents = teacher(**call).images
            teacher_nfe = samples[0] // len(index)
            final_latents = student_latents.clone()
            final_latents[index] = teacher_latents.to(final_latents.dtype)

        # 5. Decode: the kept images are the student's own decoded images, bit for bit
        if output_type == "latent":
            output_images = final_latents
        else:
            if index:
                images = images.clone()
                images[index] = decode_latents(self.teacher.vae, teacher_latents).to(images.dtype)
            output_images = self.image_processor.postprocess(images, output_type=output_type)

        # 6. The price: student NFE for every image, plus the teacher's for the refined ones
        nfe = [student_nfe + (teacher_nfe if r else 0) for r in refined.tolist()]
        output = AdaptiveCollabPipelineOutput(
            images=output_images, scores=scores, refined=refined, nfe=nfe, average_nfe=sum(nfe) / total,
            threshold=float(threshold),
        )  # fmt: skip
        return output if return_dict else output.to_tuple()
