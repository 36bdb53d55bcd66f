"""`ConsistencyStudentScheduler`: one- and few-step sampling with a one-step student (METHODS.md section 1).

The student is called at its conditioning timestep `t_init` on `z` (SwiftBrush, `t_init = 999`) or on
`s_{t_init} z` (SiD-LSG, `t_init = 625`), and its output is converted to `x0`. With `K > 1` steps, the previous
`x0` is re-noised with fresh noise at `t_i = floor(t_init (1 - i / K))` and denoised again (consistency-model
multistep sampling, Song et al. 2023, Algorithm 1; SiD-LSG's multi-step evaluation). A consistency student saves its
tuned mid noise level as `mid_timestep` (ECT's two-step sampling: `[t_init, mid_timestep]`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr
from diffusers.schedulers.scheduling_ddpm import betas_for_alpha_bar
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..models.denoiser import INPUT_TYPES, PREDICTION_TYPES, alpha_sigma, student_input, to_x0_eps


__all__ = ["ConsistencyStudentScheduler", "ConsistencyStudentSchedulerOutput"]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@dataclass
class ConsistencyStudentSchedulerOutput(BaseOutput):
    r"""
    Output class for [`ConsistencyStudentScheduler.step`].

    Args:
        prev_sample (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`):
            The input of the next step: `x0` re-noised to the next timestep, or `x0` itself after the last step.
        denoised (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`):
            The student's `x0` prediction at the current timestep.
    """

    prev_sample: torch.Tensor
    denoised: torch.Tensor


class ConsistencyStudentScheduler(SchedulerMixin, ConfigMixin):
    r"""
    Sampler for one-step students (SwiftBrush, SiD-LSG, consistency students): predict `x0` at the conditioning
    timestep and, for more steps, re-noise it with fresh noise and predict again. The VP schedule
    `x_t = a_t x0 + s_t eps` with `a_t = sqrt(abar_t)`, `s_t = sqrt(1 - abar_t)` is the teacher's.

    This model inherits from [`SchedulerMixin`] and [`ConfigMixin`] (loading, saving, `from_config`).

    Args:
        num_train_timesteps (`int`, defaults to `1000`):
            The number of diffusion steps of the teacher's training schedule.
        beta_start (`float`, defaults to `0.00085`):
            The first `beta` of the schedule.
        beta_end (`float`, defaults to `0.012`):
            The last `beta` of the schedule.
        beta_schedule (`str`, defaults to `"scaled_linear"`):
            How betas go from `beta_start` to `beta_end`: `"linear"`, `"scaled_linear"` (Stable Diffusion) or
            `"squaredcos_cap_v2"` (Glide cosine).
        trained_betas (`np.ndarray` or `list[float]`, *optional*):
            Betas passed directly (length `num_train_timesteps`), bypassing `beta_start`, `beta_end` and
            `beta_schedule`.
        prediction_type (`str`, defaults to `"epsilon"`):
            What the student predicts: `"epsilon"`, `"v_prediction"` or `"sample"` (`x0`).
        rescale_betas_zero_snr (`bool`, defaults to `False`):
            Rescale the betas to zero terminal SNR ([arXiv 2305.08891](https://huggingface.co/papers/2305.08891)).
            Then `a_{T-1} = 0`: an `"epsilon"` student cannot be converted to `x0` there, so that timestep is refused.
        t_init (`int`, defaults to `999`):
            The student's conditioning timestep, in `[0, num_train_timesteps)`: 999 in SwiftBrush, 625 in SiD-LSG.
            Also the first timestep of the default multi-step schedule.
        input_type (`str`, defaults to `"noise"`):
            The student's first input: `"noise"` feeds `z` as-is (SwiftBrush); `"scaled_noise"` feeds
            `s_{t_init} z`, i.e. `x_t` with `x0 = 0` (SiD-LSG).
        clip_sample (`bool`, defaults to `False`):
            Clip the predicted `x0` to `[-clip_sample_range, clip_sample_range]`.
        clip_sample_range (`float`, defaults to `1.0`):
            The clipping bound, used only when `clip_sample=True`.
        mid_timestep (`int`, *optional*):
            The second timestep of the multistep schedule, in `[0, t_init)`: a consistency model's mid noise level
            (ECT samples two steps at EDM sigma 0.821). `K` steps are then `t_init` followed by the `K - 1` timesteps
            `floor(mid_timestep (1 - j / (K - 1)))`, `j = 0..K-2` (the default rule, restarted at `mid_timestep`;
            our extension beyond ECT's two steps). `None`: `floor(t_init (1 - i / K))`.
    """

    # Every scheduler here runs in `OneStepPipeline` (tests/test_pipeline_conformance.py runs each). Left out of diffusers'
    # Karras list: DPMSolverSDEScheduler (needs `torchsde`, not a dependency) and EDMEulerScheduler (EDM sigmas: it
    # drops the VP betas of this config). PNDM with its default PRK warm-up needs `num_inference_steps >= 4`;
    # with `skip_prk_steps=True` (how Stable Diffusion checkpoints configure it) any step count runs.
    _compatibles = [
        e.name for e in KarrasDiffusionSchedulers if e.name not in ("DPMSolverSDEScheduler", "EDMEulerScheduler")
    ] + ["LCMScheduler", "TCDScheduler"]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        rescale_betas_zero_snr: bool = False,
        t_init: int = 999,
        input_type: str = "noise",
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        mid_timestep: int | None = None,
    ):
        if not 0 <= t_init < num_train_timesteps or int(t_init) != t_init:
            raise ValueError(f"`t_init` must be an integer in [0, {num_train_timesteps}), got {t_init!r}.")
        if input_type not in INPUT_TYPES:
            raise ValueError(f"`input_type` must be one of {INPUT_TYPES}, got {input_type!r}.")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"`prediction_type` must be one of {PREDICTION_TYPES}, got {prediction_type!r}.")
        if mid_timestep is not None and (int(mid_timestep) != mid_timestep or not 0 <= mid_timestep < t_init):
            raise ValueError(f"`mid_timestep` must be an integer in [0, t_init = {t_init}), got {mid_timestep!r}.")
        if clip_sample and not clip_sample_range > 0:
            raise ValueError(f"`clip_sample_range` must be > 0 when `clip_sample=True`, got {clip_sample_range!r}.")

        if trained_betas is not None:
            self.betas = torch.tensor(trained_betas, dtype=torch.float32)
            if self.betas.shape != (num_train_timesteps,):
                raise ValueError(
                    f"`trained_betas` must hold `num_train_timesteps`={num_train_timesteps} values, "
                    f"got shape {tuple(self.betas.shape)}."
                )
        elif beta_schedule == "linear":
            self.betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        elif beta_schedule == "scaled_linear":
            self.betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
        elif beta_schedule == "squaredcos_cap_v2":
            self.betas = betas_for_alpha_bar(num_train_timesteps)
        else:
            raise ValueError(f"`beta_schedule` must be one of {BETA_SCHEDULES}, got {beta_schedule!r}.")
        if rescale_betas_zero_snr:
            self.betas = rescale_zero_terminal_snr(self.betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self._check_invertible([t_init], "t_init")

        self.init_noise_sigma = 1.0
        # Until `set_timesteps` is called, the schedule is the one-step schedule.
        self.num_inference_steps = None
        self.timesteps = torch.tensor([t_init], dtype=torch.long)
        self._step_index = None
        self._begin_index = None

    @property
    def step_index(self) -> int | None:
        r"""The index of the current timestep in `self.timesteps`; increases by 1 after each `step`."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        r"""The index of the first timestep, set by a pipeline with `set_begin_index` (e.g. image-to-image)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        r"""
        Sets the index of the first timestep. Call from the pipeline before inference.

        Args:
            begin_index (`int`, defaults to `0`):
                The begin index for the scheduler.
        """
        self._begin_index = begin_index

    def index_for_timestep(self, timestep: int | torch.Tensor) -> int:
        r"""The position of `timestep` in `self.timesteps` (timesteps are distinct, so it is unique)."""
        indices = (self.timesteps == torch.as_tensor(timestep, device=self.timesteps.device)).nonzero()
        if len(indices) == 0:
            raise ValueError(f"`timestep` {int(timestep)} is not in the schedule {self.timesteps.tolist()}.")
        return int(indices[0].item())

    def _current_index(self, timestep: int | torch.Tensor | None) -> int:
        r"""The step index `step` uses for `timestep`, without advancing it."""
        if self._step_index is not None:
            return self._step_index
        if self._begin_index is not None:
            return self._begin_index
        return 0 if timestep is None else self.index_for_timestep(timestep)

    def _init_step_index(self, timestep: int | torch.Tensor) -> None:
        r"""Sets the step index from `begin_index` or, failing that, from `timestep`'s place in the schedule."""
        self._step_index = self._current_index(timestep)

    def _alpha_sigma(self, timesteps: int | torch.Tensor, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""`(a_t, s_t)` in float32 on `sample`'s device, broadcastable to `sample`."""
        self.alphas_cumprod = self.alphas_cumprod.to(sample.device)
        return alpha_sigma(self.alphas_cumprod, timesteps, sample.ndim)

    def _check_invertible(self, timesteps: list[int], name: str) -> None:
        r"""Refuses timesteps where `a_t = 0` (zero terminal SNR) for an epsilon student: `x0` is undefined there."""
        if self.config.prediction_type == "epsilon" and any(self.alphas_cumprod[t] == 0 for t in timesteps):
            raise ValueError(
                f"`{name}` contains a timestep with `alphas_cumprod == 0` (zero terminal SNR), where an `epsilon` "
                "prediction cannot be converted to `x0`; use a smaller timestep or `prediction_type='v_prediction'`."
            )

    def _model_input(self, sample: torch.Tensor, index: int) -> torch.Tensor:
        r"""What the student sees: `s_{t_0} z` on the first step with `input_type="scaled_noise"`, else `sample`."""
        if index != 0:
            return sample
        self.alphas_cumprod = self.alphas_cumprod.to(sample.device)
        return student_input(self.alphas_cumprod, int(self.timesteps[0]), sample, self.config.input_type)

    def scale_model_input(self, sample: torch.Tensor, timestep: int | torch.Tensor | None = None) -> torch.Tensor:
        r"""
        Returns the student's input for `sample`: `s_{t_0} * sample` on the first step when
        `input_type="scaled_noise"` (SiD-LSG), `sample` unchanged otherwise (re-noised samples already are `x_t`).

        Args:
            sample (`torch.Tensor`):
                The sample the pipeline holds: the initial noise `z` on the first step.
            timestep (`int` or `torch.Tensor`, *optional*):
                The current timestep; locates the step when the step index is not set yet (`None`: the first step).

        Returns:
            `torch.Tensor`: the model input, in `sample.dtype`.
        """
        return self._model_input(sample, self._current_index(timestep))

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | torch.Tensor | None = None,
    ) -> None:
        r"""
        Sets the timesteps of the sampling chain. Pass exactly one of `num_inference_steps` and `timesteps`.

        Args:
            num_inference_steps (`int`, *optional*):
                The number of student calls `K`, in `[1, t_init + 1]`; the timesteps are
                `t_i = floor(t_init (1 - i / K))`, `i = 0..K-1` (`K = 1`: `[t_init]`), or with `mid_timestep` set,
                `t_init` then `floor(mid_timestep (1 - j / (K - 1)))`, `j = 0..K-2` (`K <= max(mid_timestep, 1) + 1`).
                A larger `K` would repeat timesteps and is refused.
            device (`str` or `torch.device`, *optional*):
                Where to put `self.timesteps`.
            timesteps (`list[int]` or `torch.Tensor`, *optional*):
                A custom schedule (LCM / TCD style): strictly descending integers in `[0, num_train_timesteps)`.
        """
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("Pass exactly one of `num_inference_steps` and `timesteps`.")
        t_init, num_train_timesteps = self.config.t_init, self.config.num_train_timesteps
        if timesteps is None:
            mid = self.config.get("mid_timestep")
            most = t_init + 1 if mid is None else max(mid, 1) + 1
            if (
                isinstance(num_inference_steps, bool)
                or int(num_inference_steps) != num_inference_steps
                or not 1 <= num_inference_steps <= most
            ):
                bound = "t_init + 1" if mid is None else "max(mid_timestep, 1) + 1"
                raise ValueError(
                    f"`num_inference_steps` must be an integer in [1, {bound} = {most}] (more steps would repeat "
                    f"timesteps), got {num_inference_steps!r}."
                )
            num_inference_steps = int(num_inference_steps)
            # Integer arithmetic: exactly floor(t_init * (1 - i / K)), with no float rounding.
            if mid is None or num_inference_steps == 1:
                schedule = [t_init * (num_inference_steps - i) // num_inference_steps for i in range(num_inference_steps)]
            else:
                rest = num_inference_steps - 1
                schedule = [t_init] + [mid * (rest - j) // rest for j in range(rest)]
        else:
            values = torch.as_tensor(timesteps).reshape(-1).tolist()
            if not values or any(int(t) != t for t in values):
                raise ValueError(f"`timesteps` must be a non-empty list of integers, got {values!r}.")
            schedule = [int(t) for t in values]
            if not all(0 <= t < num_train_timesteps for t in schedule):
                raise ValueError(f"`timesteps` must lie in [0, {num_train_timesteps}), got {schedule}.")
            if any(a <= b for a, b in zip(schedule, schedule[1:])):
                raise ValueError(f"`timesteps` must be strictly descending, got {schedule}.")
            self._check_invertible(schedule, "timesteps")
        self.timesteps = torch.tensor(schedule, dtype=torch.long, device=device)
        self.num_inference_steps = len(schedule)
        self._step_index = None
        self._begin_index = None

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> ConsistencyStudentSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        r"""
        Converts the student's output to `x0` and, unless this is the last step, re-noises it to the next timestep.

        Args:
            model_output (`torch.Tensor`):
                The student's output at `timestep` (`eps`, `v` or `x0`, per `prediction_type`).
            timestep (`int` or `torch.Tensor`):
                The current timestep, an element of `self.timesteps`.
            sample (`torch.Tensor`):
                The sample the pipeline holds (before `scale_model_input`): `z` on the first step, then `prev_sample`.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Generator(s) for the re-noising noise; a list holds one generator per sample.
            return_dict (`bool`, defaults to `True`):
                Whether to return a [`ConsistencyStudentSchedulerOutput`] or a tuple `(prev_sample, denoised)`.

        Returns:
            [`ConsistencyStudentSchedulerOutput`] or `tuple`: `prev_sample` and `denoised`, in `sample.dtype`.
        """
        if self.num_inference_steps is None:
            raise ValueError("`num_inference_steps` is None: call `set_timesteps` before `step`.")
        if self.step_index is None:
            self._init_step_index(timestep)

        # 1. Rebuild the input the student saw (the scaled_noise rule on the first step)
        x_t = self._model_input(sample, self.step_index)

        # 2. Convert the output to x0 at the current timestep (float32, see `to_x0_eps`)
        alpha, sigma = self._alpha_sigma(timestep, sample)
        denoised, _ = to_x0_eps(model_output, x_t, alpha, sigma, self.config.prediction_type)

        # 3. Clip x0
        if self.config.clip_sample:
            denoised = denoised.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)

        # 4. Re-noise x0 to the next timestep with fresh noise [x_{t'} = a_{t'} x0 + s_{t'} eps'], or stop at x0.
        # The noise is drawn in float32 so that a seed gives the same noise whatever the sample's dtype.
        next_index = self.step_index + 1
        if next_index < len(self.timesteps):
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
            alpha_next, sigma_next = self._alpha_sigma(self.timesteps[next_index], sample)
            prev_sample = alpha_next * denoised + sigma_next * noise
        else:
            prev_sample = denoised

        # 5. Advance the step index
        self._step_index += 1

        prev_sample, denoised = prev_sample.to(sample.dtype), denoised.to(sample.dtype)
        if not return_dict:
            return (prev_sample, denoised)
        return ConsistencyStudentSchedulerOutput(prev_sample=prev_sample, denoised=denoised)

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor | int
    ) -> torch.Tensor:
        r"""
        The forward process `x_t = a_t x0 + s_t noise`, computed in float32.

        Args:
            original_samples (`torch.Tensor`): `x0`, shape `(batch_size, ...)`.
            noise (`torch.Tensor`): the noise, same shape.
            timesteps (`torch.Tensor` or `int`): one timestep, or one per sample (`(batch_size,)`).

        Returns:
            `torch.Tensor`: `x_t`, in `original_samples.dtype`.
        """
        alpha, sigma = self._alpha_sigma(timesteps, original_samples)
        return (alpha * original_samples.float() + sigma * noise.float()).to(original_samples.dtype)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
