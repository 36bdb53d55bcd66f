"""The training loop's plumbing: step iterator, deterministic randomness, NaN guard, atomic checkpoints, resume.

Randomness is keyed by `(seed, micro_step)` and drawn for the global batch on every rank (each rank keeps its slice),
so a resumed run and a multi-process run reproduce a single uninterrupted process.

Checkpoints are atomic end to end: each is written to a hidden `.checkpoint-N.partial` directory, completed by a
`checkpoint.json` manifest (every file and its size), and renamed into place; an old checkpoint is renamed to a hidden
`.checkpoint-N.trash` before it is deleted, so a kill at any moment never leaves a visible incomplete `checkpoint-N`.
`--max_train_minutes` stops a run early by a clock (`TrainingTimer`: wall, or the process's CPU time), after a final
checkpoint; every manifest records the timer's minutes at its step. `--resume_from_checkpoint latest` skips a latest checkpoint that does not match its manifest or fails to load, with a
warning, and resumes from the previous good one. Weights that are not finite, or beyond float16's range (see
`check_weights`), are never written.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .errors import NonFiniteError


__all__ = [
    "CHECKPOINT_MANIFEST",
    "LoopStep",
    "NaNGuard",
    "NonFiniteError",
    "all_finite",
    "backward_if_finite",
    "check_weights",
    "checkpoint_problem",
    "guard_finite",
    "list_checkpoints",
    "optimizer_step",
    "rank_slice",
    "register_checkpoint_hooks",
    "resume_from_checkpoint",
    "save_checkpoint",
    "step_generator",
    "training_loop",
    "TrainingTimer",
]

logger = get_logger(__name__)
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
CHECKPOINT_MANIFEST = "checkpoint.json"
# Refused weight magnitude: a one-step student is served in half precision, so a weight float16 cannot hold is a
# diverged run, never a trained model (a healthy UNet's weights are O(1)).
MAX_WEIGHT = float(torch.finfo(torch.float16).max)


def step_generator(seed: int | None, micro_step: int) -> torch.Generator:
    r"""A CPU generator seeded by `(seed, micro_step)`: the same draws on every rank, in every resumed run."""
    return torch.Generator().manual_seed((seed or 0) * 1_000_003 + micro_step)


def rank_slice(batch: torch.Tensor | Sequence, accelerator: Accelerator):
    r"""This rank's share of a global batch (first dimension split into `num_processes` equal parts)."""
    size = len(batch) // accelerator.num_processes
    return batch[accelerator.process_index * size : (accelerator.process_index + 1) * size]


def all_finite(accelerator: Accelerator, *tensors: torch.Tensor) -> bool:
    r"""Whether every tensor is finite on every rank (one small all-gather, so all ranks agree)."""
    flag = all(bool(torch.isfinite(t.detach()).all()) for t in tensors)
    flags = accelerator.gather(torch.tensor([float(flag)], device=accelerator.device))
    return bool(flags.min() > 0)


class NaNGuard:
    r"""
    What to do with a non-finite loss or gradient: stop (`policy="raise"`), or skip the update (`policy="skip"`) at
    most `max_skips` times within any `window` consecutive optimizer steps, then stop with `NonFiniteError` (a run
    whose steps keep failing has diverged; saving it would save garbage). The count is not checkpointed: a resumed
    run starts a fresh window.

    Args:
        policy (`str`, defaults to `"raise"`): `"raise"` or `"skip"` (`--nan_policy`).
        max_skips (`int`, defaults to 5): `--max_nan_skips`.
        window (`int`, defaults to 100): `--nan_skip_window`, in optimizer steps.
    """

    def __init__(self, policy: str = "raise", max_skips: int = 5, window: int = 100):
        if policy not in ("raise", "skip"):
            raise ValueError(f"`nan_policy` must be 'raise' or 'skip', got {policy!r}.")
        if max_skips < 0 or window < 1:
            raise ValueError(f"need `max_skips` >= 0 and `window` >= 1, got {max_skips} and {window}.")
        self.policy, self.max_skips, self.window = policy, max_skips, window
        self.skipped: collections.deque[int] = collections.deque()

    def skip(self, step: int, message: str) -> None:
        r"""Records that optimizer step `step` is skipped; raises `NonFiniteError` past the budget."""
        if self.policy == "raise":
            raise NonFiniteError(message + " Pass --nan_policy skip to skip such steps instead.")
        if not self.skipped or self.skipped[-1] != step:
            self.skipped.append(step)
        while self.skipped[0] <= step - self.window:
            self.skipped.popleft()
        if len(self.skipped) > self.max_skips:
            raise NonFiniteError(
                f"{message} {len(self.skipped)} of the last {self.window} optimizer steps were skipped, more than "
                f"--max_nan_skips {self.max_skips} per --nan_skip_window {self.window}: the run has diverged and was "
                "stopped (the last checkpoint is untouched). Lower --learning_rate or use --mixed_precision bf16."
            )
        logger.warning(message + f" Skipping the step (--nan_policy skip, {len(self.skipped)}/{self.max_skips}).")


def _as_guard(nan_policy: str | NaNGuard) -> NaNGuard:
    # a bare "skip" string has no memory, so it cannot bound the skips: scripts pass a NaNGuard
    return nan_policy if isinstance(nan_policy, NaNGuard) else NaNGuard(nan_policy, max_skips=2**62)


def guard_finite(
    accelerator: Accelerator, step: int, nan_policy: str | NaNGuard = "raise", **values: torch.Tensor
) -> bool:
    r"""
    `True` when every value is finite on every rank. Otherwise raises `NonFiniteError` (`nan_policy="raise"`), or
    logs a warning and returns `False` so the caller skips the update (`"skip"`; a `NaNGuard` also bounds the skips).
    """
    if all_finite(accelerator, *values.values()):
        return True
    shown = ", ".join(f"{name}={v.detach().float().mean().item():.4g}" for name, v in values.items())
    _as_guard(nan_policy).skip(
        step,
        f"Non-finite value at optimizer step {step}: {shown}. Nothing was updated and no checkpoint was written. "
        "Usual causes: fp16 overflow (use --mixed_precision bf16), a learning rate too high, a broken teacher.",
    )
    return False


def check_weights(accelerator: Accelerator | None, params: Sequence[torch.Tensor], what: str) -> None:
    r"""
    Raises `NonFiniteError` naming `what` when a weight of `params` is NaN or infinite, or finite but beyond
    float16's largest value (65504, `MAX_WEIGHT`). That bound is the definition of "absurd" used here: a one-step
    student is served in half precision, where such a weight overflows, and a healthy UNet's weights are O(1). With
    an `accelerator`, every rank agrees (one all-gather).
    """
    bad = None
    for p in params:
        if not torch.isfinite(p.detach()).all():
            bad = "contain NaN or inf"
            break
        if p.numel() and p.detach().abs().max().item() > MAX_WEIGHT:
            bad = f"exceed float16's range (|w| > {MAX_WEIGHT:g}): the run diverged"
            break
    if accelerator is not None:
        flags = accelerator.gather(torch.tensor([float(bad is None)], device=accelerator.device))
        if bool(flags.min() > 0) is False and bad is None:
            bad = "are not finite or too large on another rank"
    if bad is not None:
        raise NonFiniteError(f"Refusing to write {what}: the trainable weights {bad}. Nothing was written.")


def backward_if_finite(
    accelerator: Accelerator, loss: torch.Tensor, step: int, nan_policy: str | NaNGuard = "raise", name: str = "loss"
) -> bool:
    r"""
    `accelerator.backward(loss)` when `loss` is finite on every rank (see `guard_finite`). A skipped step still runs
    a backward of `nan_to_num(loss) * 0`, because under DDP every forward through a prepared module needs its
    backward; non-finite gradients it may leave are then dropped by `optimizer_step`.
    """
    finite = guard_finite(accelerator, step, nan_policy, **{name: loss})
    accelerator.backward(loss if finite else torch.nan_to_num(loss) * 0.0)
    return finite


def optimizer_step(
    accelerator: Accelerator,
    optimizer,
    lr_scheduler,
    params: list[torch.nn.Parameter],
    max_grad_norm: float,
    step: int,
    nan_policy: str | NaNGuard = "raise",
) -> torch.Tensor | None:
    r"""
    Clips gradients, checks their norm is finite (except under an fp16 grad scaler, which skips overflows itself),
    steps the optimizer and the schedule, and zeroes the gradients. Returns the gradient norm on sync micro-steps.
    """
    grad_norm = None
    if accelerator.sync_gradients:
        grad_norm = accelerator.clip_grad_norm_(params, max_grad_norm)
        if accelerator.scaler is None and not guard_finite(accelerator, step, nan_policy, grad_norm=grad_norm):
            optimizer.zero_grad(set_to_none=True)
            lr_scheduler.step()
            return grad_norm
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


@dataclass
class LoopStep:
    r"""
    One micro-step of the loop.

    Args:
        global_step (`int`): optimizer steps completed before this micro-step.
        micro_step (`int`): index of this micro-step since the start of training (resume-aware).
        generator (`torch.Generator`): seeded by `(seed, micro_step)`; draw global-batch randomness from it.
        logs (`dict`): values the body wants logged (tensors are fine; read after the step).
    """

    global_step: int
    micro_step: int
    generator: torch.Generator
    logs: dict = field(default_factory=dict)


class TrainingTimer:
    r"""
    Minutes of training since `start()`, by one clock: `"wall"` (`time.monotonic`) or `"cpu"` (`time.process_time`:
    this process's CPU time summed over its threads, i.e. core-minutes, the fair budget on a shared CPU; it does not
    count GPU work). Also remembers the last finished optimizer step (`last_step`).
    """

    def __init__(self, clock: str = "wall"):
        if clock not in ("wall", "cpu"):
            raise ValueError(f"`clock` must be 'wall' or 'cpu', got {clock!r}.")
        self.clock = clock
        self._read = time.monotonic if clock == "wall" else time.process_time
        self._start = self._read()
        self.last_step: int | None = None

    def start(self) -> None:
        self._start = self._read()

    def minutes(self) -> float:
        return (self._read() - self._start) / 60


def _over_budget(accelerator: Accelerator, timer: TrainingTimer, budget: float | None) -> bool:
    r"""Whether `budget` minutes are spent on any rank (shared, so that every rank stops at the same step)."""
    if budget is None:
        return False
    over = timer.minutes() >= budget
    if accelerator.num_processes == 1:  # no device tensor, no synchronisation, in the hot loop
        return over
    flag = accelerator.reduce(torch.tensor([float(over)], device=accelerator.device), reduction="sum")
    return bool(flag.item() > 0)


def training_loop(
    accelerator: Accelerator,
    args,
    first_step: int = 0,
    checkpoint_fn: Callable[[int], None] | None = None,
    validation_fn: Callable[[int], None] | None = None,
    timer: TrainingTimer | None = None,
) -> Iterator[LoopStep]:
    r"""
    Yields micro-steps until `args.max_train_steps` optimizer steps are done, or until `args.max_train_minutes` (when
    set) are spent on `timer`'s clock. After each optimizer step it updates the progress bar, logs `step.logs` to the
    trackers, and calls `checkpoint_fn(step)` every `args.checkpointing_steps` and `validation_fn(step)` every
    `args.validation_steps` (main process only). A run stopped by the budget is checkpointed at its last step.

    Args:
        accelerator (`Accelerator`): the run's accelerator (its `sync_gradients` marks optimizer steps).
        args: `TrainingArguments` (`max_train_steps`, `gradient_accumulation_steps`, `seed`, cadences, and the
            optional `max_train_minutes` / `train_clock`).
        first_step (`int`): optimizer steps already done (from `resume_from_checkpoint`).
        timer (`TrainingTimer`, *optional*): started here; its `last_step` is kept up to date. Defaults to a new
            timer on `args.train_clock`. A resumed run's budget counts from the resume.

    Returns:
        An iterator of `LoopStep`.
    """
    timer = timer if timer is not None else TrainingTimer(getattr(args, "train_clock", "wall"))
    timer.start()
    budget = getattr(args, "max_train_minutes", None)
    progress = tqdm(
        range(args.max_train_steps), initial=first_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    global_step, micro_step = first_step, first_step * args.gradient_accumulation_steps
    timer.last_step = global_step
    while global_step < args.max_train_steps:
        step = LoopStep(global_step, micro_step, step_generator(args.seed, micro_step))
        yield step
        micro_step += 1
        if not accelerator.sync_gradients:
            continue
        global_step += 1
        timer.last_step = global_step
        logs = {name: float(value) for name, value in step.logs.items()}
        progress.update(1)
        progress.set_postfix(**{k: f"{v:.4g}" for k, v in logs.items()})
        accelerator.log(logs, step=global_step)
        if checkpoint_fn is not None and global_step % args.checkpointing_steps == 0:
            checkpoint_fn(global_step)
        if validation_fn is not None and accelerator.is_main_process and global_step % args.validation_steps == 0:
            validation_fn(global_step)
        if global_step < args.max_train_steps and _over_budget(accelerator, timer, budget):
            logger.info(f"--max_train_minutes {budget:g} spent ({timer.clock} clock) at step {global_step}: stopping")
            if checkpoint_fn is not None and global_step % args.checkpointing_steps != 0:
                checkpoint_fn(global_step)
            break
    progress.close()


def list_checkpoints(output_dir: str) -> list[str]:
    r"""The complete checkpoints `output_dir/checkpoint-N`, oldest first (partial saves are hidden and skipped)."""
    if not os.path.isdir(output_dir):
        return []
    names = [
        n for n in os.listdir(output_dir) if _CHECKPOINT.fullmatch(n) and os.path.isdir(os.path.join(output_dir, n))
    ]
    return [os.path.join(output_dir, n) for n in sorted(names, key=lambda n: int(n.split("-")[1]))]


def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())


def _write_manifest(path: str, step: int, info: dict | None = None) -> None:
    files = {}
    for root, _, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            files[os.path.relpath(full, path)] = os.path.getsize(full)
    with open(os.path.join(path, CHECKPOINT_MANIFEST), "w", encoding="utf-8") as f:
        json.dump({"step": step, **(info or {}), "files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def checkpoint_problem(path: str) -> str | None:
    r"""
    Why the checkpoint directory `path` cannot be resumed from (a missing or mismatching file against its
    `checkpoint.json` manifest), or `None` when it looks complete. Checkpoints written before manifests existed are
    accepted; their load is still checked by `resume_from_checkpoint`.
    """
    manifest_path = os.path.join(path, CHECKPOINT_MANIFEST)
    if not os.path.isfile(manifest_path):
        return None
    try:
        with open(manifest_path, encoding="utf-8") as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as error:
        return f"unreadable {CHECKPOINT_MANIFEST} ({error})"
    for name, size in files.items():
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            return f"{name} is missing"
        if os.path.getsize(full) != size:
            return f"{name} has {os.path.getsize(full)} bytes, {size} were written"
    return None


def _remove_dir(path: str) -> None:
    """Deletes a directory without ever leaving it visible half-deleted: hidden rename first, then delete."""
    parent, name = os.path.split(path)
    trash = os.path.join(parent, f".{name}.trash")
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(path, trash)
    shutil.rmtree(trash)


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str,
    step: int,
    total_limit: int | None = None,
    params: Sequence[torch.Tensor] = (),
    info: dict | None = None,
) -> str:
    r"""
    Saves a resumable checkpoint atomically to `output_dir/checkpoint-{step}` (call on every rank).

    The state is written to `.checkpoint-{step}.partial`, completed by a `checkpoint.json` manifest, and renamed into
    place; older checkpoints beyond `total_limit` are deleted only afterwards, each renamed to a hidden
    `.checkpoint-N.trash` first. Raises `NonFiniteError` before writing anything when one of `params` (the trainable
    weights) is not finite or beyond float16's range (`check_weights`). `info` (JSON values) is written into the
    manifest beside the step, e.g. the training minutes at this step.
    """
    if params:
        check_weights(accelerator, params, f"checkpoint-{step}")
    final = os.path.join(output_dir, f"checkpoint-{step}")
    partial = os.path.join(output_dir, f".checkpoint-{step}.partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(partial)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _fsync_tree(partial)
        _write_manifest(partial, step, info)
        if os.path.exists(final):  # re-saving a step (after a resume): swap, never leave a gap
            stale = os.path.join(output_dir, f".checkpoint-{step}.old")
            shutil.rmtree(stale, ignore_errors=True)
            os.rename(final, stale)
            os.rename(partial, final)
            shutil.rmtree(stale)
        else:
            os.rename(partial, final)
        checkpoints = list_checkpoints(output_dir)
        if total_limit is not None and len(checkpoints) > total_limit:
            for old in checkpoints[: len(checkpoints) - total_limit]:
                logger.info(f"Removing {old} (--checkpoints_total_limit {total_limit})")
                _remove_dir(old)
        logger.info(f"Saved state to {final}")
    accelerator.wait_for_everyone()
    return final


def resume_from_checkpoint(accelerator: Accelerator, output_dir: str, resume: str | None) -> int:
    r"""
    Restores the state of `resume` (`"latest"` or a checkpoint directory) and returns its optimizer step; 0 when
    `resume` is `None` or `"latest"` finds no checkpoint. Leftovers of interrupted saves and deletions are removed.

    With `"latest"`, a checkpoint that does not match its manifest or fails to load is skipped with a warning and the
    previous one is tried (a run whose every checkpoint is unreadable raises `ValueError`). An explicit directory
    that is incomplete raises `ValueError`.
    """
    if accelerator.is_main_process and os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            if name.startswith(".checkpoint-"):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    accelerator.wait_for_everyone()
    if resume is None:
        return 0
    if resume == "latest":
        candidates = list_checkpoints(output_dir)[::-1]
        if not candidates:
            logger.info(f"No checkpoint in {output_dir}: starting a new run.")
            return 0
    else:
        match = _CHECKPOINT.fullmatch(os.path.basename(os.path.normpath(resume)))
        if not os.path.isdir(resume) or match is None:
            raise ValueError(
                f"`--resume_from_checkpoint` must be 'latest' or a checkpoint-N directory, got {resume!r}."
            )
        candidates = [resume]
    problems = []
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            try:
                logger.info(f"Resuming from {path}")
                accelerator.load_state(path)
                return int(os.path.basename(os.path.normpath(path)).split("-")[1])
            except Exception as error:  # a corrupt file: safetensors / pickle / shape errors
                problem = f"failed to load ({type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]})"
        problems.append(f"{path}: {problem}")
        if resume != "latest":
            raise ValueError(f"`--resume_from_checkpoint` {path} is incomplete or corrupt: {problem}.")
        logger.warning(f"Skipping {path}: {problem}. Trying the previous checkpoint.")
    raise ValueError(
        f"No checkpoint in {output_dir} can be resumed from ({'; '.join(problems)}): remove them or pass "
        "`--resume_from_checkpoint` a good one."
    )


def register_checkpoint_hooks(accelerator: Accelerator, ema=None) -> None:
    r"""
    Makes `save_state` / `load_state` store only the trainable parameters of each prepared model (safetensors), plus
    the EMA weights when `ema` (a diffusers `EMAModel`) is given, instead of whole frozen UNets and pickles.
    """

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for i, model in enumerate(models):
                named = accelerator.unwrap_model(model).named_parameters()
                state = {n: p.detach().contiguous() for n, p in named if p.requires_grad}
                save_file(state, os.path.join(output_dir, f"trainable_{i}.safetensors"))
            if ema is not None:
                ema_state = ema.state_dict()
                shadow = ema_state.pop("shadow_params")
                save_file({str(i): t.contiguous() for i, t in enumerate(shadow)}, f"{output_dir}/ema.safetensors")
                with open(os.path.join(output_dir, "ema.json"), "w") as f:
                    json.dump(ema_state, f)
        weights.clear()

    def load_hook(models, input_dir):
        for i, model in enumerate(models):
            state = load_file(os.path.join(input_dir, f"trainable_{i}.safetensors"))
            unwrapped = accelerator.unwrap_model(model)
            missing, unexpected = unwrapped.load_state_dict(state, strict=False)
            trainable = {n for n, p in unwrapped.named_parameters() if p.requires_grad}
            if unexpected or trainable & set(missing):
                raise ValueError(f"{input_dir} does not match this run's trainable weights (model {i}).")
        models.clear()
        if ema is not None:
            with open(os.path.join(input_dir, "ema.json")) as f:
                ema_state = json.load(f)
            shadow = load_file(os.path.join(input_dir, "ema.safetensors"))
            ema_state["shadow_params"] = [shadow[str(i)] for i in range(len(shadow))]
            ema.load_state_dict(ema_state)
            ema.to(device=accelerator.device)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
