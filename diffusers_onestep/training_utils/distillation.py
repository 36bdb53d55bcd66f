"""The wiring every score-distillation script shares: student, frozen teacher and fake score, set up and saved.

`Distillation.setup(args, method_args, ...)` does what PG-SB, SiD and later methods all need before their first
iteration: the accelerator, the frozen teacher (SD 1.x / 2.x, SDXL or PixArt, in the training dtype), the student (a
full float32 copy or a LoRA adapter) and the fake score (a LoRA adapter on the shared frozen base, or a full trainable
copy of the teacher), their optimizers and learning-rate schedules, `accelerator.prepare`, the student's EMA,
checkpoint hooks, the resume, the trackers, the three roles as `Denoiser`s, the empty-prompt conditioning, the prompt
batches, validation and checkpointing. `finish(...)` saves the student (EMA weights when kept), the model card and the
optional Hub upload. The scripts keep only their per-iteration body, which therefore reads as the paper's algorithm.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from typing import Any

import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from ..losses import Denoiser
from ..schedulers import ConsistencyStudentScheduler
from .args import resolve_max_train_steps, secret_argument_names
from .backbones import build_student_pipeline
from .data import prompt_batches
from .hub import format_command, push_to_hub, save_model_card, save_student
from .loop import (
    LoopStep,
    NaNGuard,
    TrainingTimer,
    backward_if_finite,
    check_weights,
    optimizer_step,
    rank_slice,
    register_checkpoint_hooks,
    resume_from_checkpoint,
    save_checkpoint,
    training_loop,
)
from .setup import (
    FAKE_SCORE_ADAPTER,
    AdapterView,
    build_distillation_unets,
    encode_prompts,
    load_teacher,
    make_optimizer,
    setup_accelerator,
    teacher_latent_shape,
    weight_dtype,
)
from .validation import log_validation


__all__ = ["Distillation"]


class Distillation:
    r"""
    One distillation run's shared state (build it with `Distillation.setup`). Attributes the per-iteration body uses:

    - `accelerator`, `args`, `device`, `dtype`, `num_processes`, `latent_shape`, `scheduler` (the student's);
    - `teacher` (`TeacherComponents`), `unets` (`DistillationUNets`), `models` (the prepared modules, for
      `accelerator.accumulate`);
    - `student` (`AdapterView`, gradients on), `teacher_score`, `fake_score` (no-grad `Denoiser`s on the unwrapped
      networks), `fake_score_train` (the fake score's `Denoiser` through its prepared module);
    - `opt_student`, `opt_fake`, `sched_student`, `sched_fake`, `ema`, `nan_guard`, `uncond` (the empty prompt's
      conditioning), `encoding` (the keyword arguments of `encode_prompts`), `alphas_cumprod`;
    - `batches` (an endless iterator of global prompt batches, resumed where the checkpoint left it);
    - `critic`, `critic_base`, `opt_critic`, `sched_critic`: a method's own extra player (ACT's discriminator),
      prepared, checkpointed and resumed with the rest (`None` without one).
    """

    @classmethod
    def setup(
        cls,
        args,
        method_args,
        argument_types: tuple[type, ...],
        examples: list,
        *,
        fake_score_learning_rate: float | None = None,
        fake_score_lora_rank: int | None = None,
        fake_score_lora_alpha: int | None = None,
        fake_score_lora_target_modules: str = "to_q,to_k,to_v,to_out.0",
        critic=None,
        critic_learning_rate: float | None = None,
        critic_betas: tuple[float, float] | None = None,
    ) -> Distillation:
        r"""
        Sets the run up (see the module docstring). `examples` are what the batches are drawn from: the prompts of a
        data-free run, the dataset indices of a real-data run (`ImageCaptionDataset.indices`). `fake_score_lora_rank=0`
        makes the fake score a full trainable float32 copy of the teacher (SiD's choice), `> 0` a LoRA adapter on the
        teacher's frozen network, `None` (consistency tuning) no fake score at all (`fake_score`, `opt_fake`, ...
        are then `None`). `critic` (a factory `TeacherComponents -> nn.Module`, called once the teacher is loaded) adds
        a trained network of the method's own, e.g. ACT's discriminator, with its own optimizer (`critic_learning_rate`,
        `critic_betas`, else the student's). `argument_types` are the script's argument dataclasses (for the trackers'
        config, secrets left out).
        """
        run = cls()
        run.args = args
        run.accelerator = accelerator = setup_accelerator(args, find_unused_parameters=args.student_lora_rank > 0)
        run.device, run.dtype, n = accelerator.device, weight_dtype(accelerator), accelerator.num_processes
        run.num_processes = n
        resolve_max_train_steps(args, len(examples), n)
        run.teacher = teacher = load_teacher(
            args.pretrained_teacher_model_name_or_path, revision=args.revision, variant=args.variant, dtype=run.dtype,
            device=run.device,
        )  # fmt: skip
        run.latent_shape = teacher_latent_shape(teacher, args.resolution)
        run.unets = unets = build_distillation_unets(
            teacher.network, student_lora_rank=args.student_lora_rank, student_lora_alpha=args.student_lora_alpha,
            student_lora_target_modules=args.student_lora_target_modules, fake_score_lora_rank=fake_score_lora_rank,
            fake_score_lora_alpha=fake_score_lora_alpha, fake_score_lora_target_modules=fake_score_lora_target_modules,
            gradient_checkpointing=args.gradient_checkpointing, dtype=run.dtype,
        )  # fmt: skip
        run.scheduler = ConsistencyStudentScheduler.from_config(
            teacher.scheduler.config, t_init=args.t_init, input_type=args.input_type
        )

        # Optimizers (AdamW or RAdam, betas from the arguments: SiD's (0, 0.999) through --adam_beta1 0), schedules
        adam = {"betas": (args.adam_beta1, args.adam_beta2), "weight_decay": args.adam_weight_decay}
        adam.update(eps=args.adam_epsilon, use_8bit_adam=args.use_8bit_adam, name=args.optimizer)
        optimizers = [make_optimizer(unets.student_parameters, learning_rate=args.learning_rate, **adam)]
        if unets.fake_score_parameters:
            optimizers.append(make_optimizer(unets.fake_score_parameters, learning_rate=fake_score_learning_rate,
                                             **adam))  # fmt: skip
        critic = critic(teacher).to(run.device).float().train() if critic is not None else None
        if critic is not None:
            critic_adam = {**adam, "betas": critic_betas or adam["betas"]}
            optimizers.append(make_optimizer(list(critic.parameters()), learning_rate=critic_learning_rate
                                             or args.learning_rate, **critic_adam))  # fmt: skip
        schedules = [  # prepared schedules step once per process (diffusers' convention)
            get_scheduler(args.lr_scheduler, opt, num_warmup_steps=args.lr_warmup_steps * n,
                          num_training_steps=args.max_train_steps * n)  # fmt: skip
            for opt in optimizers
        ]
        models = [unets.student] if unets.shared or not unets.fake_score_parameters else [unets.student, unets.teacher]
        if unets.fake_score is not None:
            models.append(unets.fake_score)
        if critic is not None:
            models.append(critic)
        prepared = accelerator.prepare(*models, *optimizers, *schedules)
        k = len(optimizers)
        models, optimizers, schedules = list(prepared[: len(models)]), prepared[len(models) : -k], prepared[-k:]
        run.opt_student, run.sched_student = optimizers[0], schedules[0]
        has_fake = bool(unets.fake_score_parameters)
        run.opt_fake, run.sched_fake = (optimizers[1], schedules[1]) if has_fake else (None, None)
        run.critic = models.pop() if critic is not None else None
        run.opt_critic, run.sched_critic = (optimizers[-1], schedules[-1]) if critic is not None else (None, None)
        run.critic_base = critic
        run.models = models
        run.ema = EMAModel(unets.student_parameters, decay=args.ema_decay) if args.use_ema else None
        register_checkpoint_hooks(accelerator, run.ema)
        run.first_step = resume_from_checkpoint(accelerator, args.output_dir, args.resume_from_checkpoint)
        if accelerator.is_main_process:
            secret = set(secret_argument_names(argument_types))
            config = {k: v for k, v in {**asdict(args), **asdict(method_args)}.items()
                      if isinstance(v, (int, float, str, bool)) and k not in secret}  # fmt: skip
            accelerator.init_trackers(args.tracker_project_name, config=config)

        # The roles as x0 / eps denoisers. Grad passes go through the prepared (DDP) modules; no-grad passes use the
        # unwrapped base. With a LoRA student all views are one network with adapters switched. Prompts become
        # conditioning dicts through the teacher pipeline's own encode_prompt (its unconditional branch included).
        run.base_student = accelerator.unwrap_model(models[0])
        base_teacher = unets.teacher if len(models) == 1 and not unets.shared else accelerator.unwrap_model(
            models[0 if unets.shared else 1]
        )
        run.student = AdapterView(models[0], unets.student_adapter, base=run.base_student)
        acp = run.alphas_cumprod = teacher.scheduler.alphas_cumprod.to(run.device)
        prediction_type = teacher.scheduler.config.prediction_type
        run.teacher_score = Denoiser(AdapterView(base_teacher, None), acp, prediction_type)
        if not unets.fake_score_parameters:  # no fake score (consistency tuning)
            run.fake_score = run.fake_score_train = None
        elif unets.fake_score is None:  # a LoRA adapter on the shared frozen base
            run.fake_score = Denoiser(AdapterView(base_teacher, FAKE_SCORE_ADAPTER), acp, prediction_type)
            fake_train = AdapterView(models[-1], FAKE_SCORE_ADAPTER, base=base_teacher)
        else:  # a full trainable copy
            base_fake = accelerator.unwrap_model(models[-1])
            run.fake_score = Denoiser(AdapterView(base_fake, None), acp, prediction_type)
            fake_train = AdapterView(models[-1], None, base=base_fake)
        if unets.fake_score_parameters:
            run.fake_score_train = Denoiser(fake_train, acp, prediction_type)
        run.encoding = {"device": run.device, "dtype": run.dtype, "resolution": args.resolution}
        run.uncond = encode_prompts(teacher, [""], unconditional=True, **run.encoding)
        run.trainable = unets.student_parameters + unets.fake_score_parameters
        if critic is not None:
            run.trainable = run.trainable + list(critic.parameters())
        run.batches = prompt_batches(
            examples, args.train_batch_size * n, args.seed, start=run.first_step * args.gradient_accumulation_steps
        )
        run.nan_guard = NaNGuard(args.nan_policy, args.max_nan_skips, args.nan_skip_window)
        if run.critic is not None:
            run.models = [*run.models, run.critic]  # `accelerator.accumulate` covers it
        return run

    # ------------------------------------------------------------------------------------------------ the loop

    def encode(self, prompts: list[str]) -> dict:
        r"""The conditioning dict of `prompts` through the teacher pipeline's own `encode_prompt`."""
        return encode_prompts(self.teacher, prompts, **self.encoding)

    def student_pipeline(self):
        r"""The current student as its backbone's one-step pipeline (shares the live weights)."""
        AdapterView(self.base_student, self.unets.student_adapter).activate()
        pipe = build_student_pipeline(self.teacher.pipeline, self.base_student, self.scheduler, self.teacher.backbone)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def validate(self, step: int) -> list[str]:
        r"""Validation images of `--validation_prompts` at `step`; returns the grid's path."""
        args, network = self.args, self.base_student
        training, _ = network.training, network.eval()  # no dropout in the images (consistency tuning trains with it)
        # the EMA weights when kept: what is saved (and, for consistency training, what samples)
        with self.ema_weights() if self.ema is not None else nullcontext(), self.accelerator.autocast():
            _, path = log_validation(
                self.student_pipeline(), prompts=args.validation_prompts, accelerator=self.accelerator, step=step,
                output_dir=args.output_dir, seed=args.seed, num_images_per_prompt=args.num_validation_images,
                **self.teacher.generation_kwargs(self.latent_shape),
            )  # fmt: skip
        network.train(training)
        return [path]

    def checkpoint(self, step: int) -> None:
        r"""A resumable checkpoint at `step`; its manifest records the training minutes on `--train_clock`."""
        info = {"train_minutes": self.timer.minutes(), "train_clock": self.timer.clock}
        save_checkpoint(self.accelerator, self.args.output_dir, step, self.args.checkpoints_total_limit, self.trainable,
                        info=info)  # fmt: skip

    def steps(self) -> Iterator[LoopStep]:
        r"""`training_loop` from the resumed step, with this run's checkpointing, validation and time budget."""
        validate = self.validate if self.args.validation_prompts else None
        self.timer = TrainingTimer(self.args.train_clock)
        return training_loop(self.accelerator, self.args, self.first_step, self.checkpoint, validate, self.timer)

    def global_noise(self, generator: torch.Generator) -> torch.Tensor:
        r"""Latent-shaped noise of the global batch from the step's generator, as this rank's slice on the device."""
        size = (self.args.train_batch_size * self.num_processes, *self.latent_shape)
        return rank_slice(torch.randn(size, generator=generator), self.accelerator).to(self.device)

    def update_student(self, loss: torch.Tensor, step: LoopStep, name: str = "loss_student", during_backward=None):
        r"""Backward of `loss` (skipped when not finite, per `--nan_policy`), then the student's optimizer step.
        `during_backward` (a context-manager factory) is entered around the backward, e.g. NASA-T's NASA under
        gradient checkpointing."""
        with during_backward() if during_backward is not None else nullcontext():
            backward_if_finite(self.accelerator, loss, step.global_step, self.nan_guard, name)
        optimizer_step(self.accelerator, self.opt_student, self.sched_student, self.unets.student_parameters,
                       self.args.max_grad_norm, step.global_step, self.nan_guard)  # fmt: skip

    def update_fake_score(self, loss: torch.Tensor, step: LoopStep, name: str = "loss_fake_score"):
        r"""Backward of `loss` (skipped when not finite), then the fake score's optimizer step."""
        backward_if_finite(self.accelerator, loss, step.global_step, self.nan_guard, name)
        optimizer_step(self.accelerator, self.opt_fake, self.sched_fake, self.unets.fake_score_parameters,
                       self.args.max_grad_norm, step.global_step, self.nan_guard)  # fmt: skip

    @contextmanager
    def fake_score_frozen(self):
        r"""`requires_grad=False` on the fake score's parameters for the block (SiD's generator step: gradients flow
        through the fake score's input into G, and none land on the fake score)."""
        with _frozen(self.unets.fake_score_parameters):
            yield

    def update_critic(self, loss: torch.Tensor, step: LoopStep, name: str = "loss_critic"):
        r"""Backward of `loss` (skipped when not finite), then the critic's optimizer step."""
        params = list(self.critic_base.parameters())
        backward_if_finite(self.accelerator, loss, step.global_step, self.nan_guard, name)
        optimizer_step(self.accelerator, self.opt_critic, self.sched_critic, params, self.args.max_grad_norm,
                       step.global_step, self.nan_guard)  # fmt: skip

    @contextmanager
    def critic_frozen(self):
        r"""`requires_grad=False` on the critic's parameters for the block (the generator's adversarial term)."""
        with _frozen(list(self.critic_base.parameters())):
            yield

    @contextmanager
    def ema_weights(self):
        r"""
        The student's EMA weights in place of its own for the block (a consistency target, validation images), then
        restored. The online weights wait in one persistent stash on the device (`EMAModel.store` would copy them
        through host memory on every call).
        """
        params = [p.data for p in self.unets.student_parameters]
        stash = self.__dict__.get("_ema_stash")
        if stash is None:
            stash = self.__dict__["_ema_stash"] = [torch.empty_like(p) for p in params]
        torch._foreach_copy_(stash, params)
        torch._foreach_copy_(params, [s.to(p.device, p.dtype) for s, p in zip(self.ema.shadow_params, params)])
        try:
            yield
        finally:
            torch._foreach_copy_(params, stash)

    def ema_step(self) -> None:
        if self.accelerator.sync_gradients and self.ema is not None:
            self.ema.step(self.unets.student_parameters)

    # ------------------------------------------------------------------------------------------------ the end

    def finish(
        self,
        argv: list[str],
        *,
        script: str,
        method_name: str,
        paper: str,
        logs: dict,
        hyperparameters: dict[str, Any],
        tags: list[str],
    ):
        r"""
        Saves the student (its EMA weights when kept), validation images, the model card and the optional Hub upload
        (main process), ends training, and returns the student pipeline on the main process (`None` elsewhere).
        """
        args, accelerator, unets = self.args, self.accelerator, self.unets
        accelerator.wait_for_everyone()
        pipeline = None
        if accelerator.is_main_process:
            if self.ema is not None:
                self.ema.copy_to(unets.student_parameters)
            check_weights(None, unets.student_parameters, "the final model")
            save_student(
                args.output_dir, network=self.base_student, scheduler=self.scheduler, teacher=self.teacher,
                adapter_name=unets.student_adapter, teacher_name_or_path=args.pretrained_teacher_model_name_or_path,
                revision=args.revision, variant=args.variant,
            )  # fmt: skip
            steps = self.timer.last_step if getattr(self, "timer", None) is not None else args.max_train_steps
            images = self.validate(steps) if args.validation_prompts else []
            repo_id = args.hub_model_id or args.output_dir.rstrip("/").split("/")[-1]
            shared = {k: getattr(args, k) for k in ("train_batch_size", "learning_rate")}
            shared["max_train_steps"] = steps  # the steps trained (fewer when --max_train_minutes stopped the run)
            save_model_card(
                args.output_dir, base_model=args.hub_base_model or args.pretrained_teacher_model_name_or_path,
                method_name=method_name, paper=paper, script=script, command=format_command(argv, script),
                metrics={k: float(v) for k, v in logs.items()}, hyperparameters={**shared, **hyperparameters},
                t_init=args.t_init, input_type=args.input_type, lora_rank=args.student_lora_rank,
                lora_alpha=args.student_lora_alpha, repo_id=repo_id, validation_images=images,
                secrets=[args.hub_token], tags=tags, pipeline_class=self.teacher.backbone.student_pipeline.__name__,
                **({"example_prompt": args.validation_prompts[0]} if args.validation_prompts else {}),
            )  # fmt: skip
            if args.push_to_hub:
                push_to_hub(
                    args.output_dir, repo_id=repo_id, token=args.hub_token, private=args.hub_private,
                    ignore_patterns=["checkpoint-*", ".*", f"{args.logging_dir}/*"], timeout=args.hub_timeout,
                    retries=args.hub_retries,
                )  # fmt: skip
            pipeline = self.student_pipeline()
            self.base_student.eval()
        accelerator.end_training()
        return pipeline


@contextmanager
def _frozen(params: list):
    r"""`requires_grad=False` on `params` for the block: gradients flow through their modules, none land on them."""
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
