"""Digits benchmark: the four tables of BENCHMARKS.md for the teacher and the one-step students.

    OMP_NUM_THREADS=1 nice -n 10 python examples/digits/benchmark.py \
        --teacher_dir /work/digits_artifacts/teacher --judge_dir /work/digits_artifacts/judge \
        --students pgsb=/work/digits_artifacts/students/pgsb swiftbrush=/work/digits_artifacts/students/swiftbrush \
        --output_dir /work/digits_artifacts/benchmark --n_per_prompt 100

Prints each table as aligned text (the configuration first, `name: value` headline lines last) and writes
`OUTPUT_DIR/results.json`, a PNG grid per model / configuration in `OUTPUT_DIR/grids/` (one row per digit, or per
negated digit in table 2) and `OUTPUT_DIR/distillation_curves.png`.

1. Quality and speed: the teacher with DPM-Solver++ at 1, 2, 4, 8, 25 steps at its best guidance scale (picked by
   digits-FID over `--guidance_scales` at `--guidance_select_steps` steps; 1 = no CFG), plus the 25-step teacher at
   the best CFG scale (or without CFG, whichever the sweep does not use), against every student at 1, 2 and 4 steps:
   digits-FID, prompt accuracy, precision / recall, NFE, images/s as a ratio to the better 25-step teacher, timed in
   this process. The real-test-vs-real-train FID floor first.
2. NASA: the generic prompt "a handwritten digit" with each digit in turn as the negative prompt (wording chosen by
   removal rate among `NEGATIVE_WORDINGS`), NASA at `--nasa_scales` (1 UNet evaluation) beside output-space CFG with
   the negative as unconditional branch (2 evaluations), both at one step: removal rate and digits-FID against the
   real train images of the nine other digits (per negated digit, averaged).
3. Adaptive collaboration: the student drafts, an independent oracle (`oracle.py`, not the judge) scores, the teacher
   refines (SDEdit, DPM-Solver++) the images below the oracle's k-th percentile; quality against average NFE for each
   k, beside the student alone and the teacher alone at about the same NFE.
4. Distillation curves: digits-FID and accuracy of each student's `checkpoint-N/` weights (trainable weights loaded
   into a copy of the student UNet; the EMA weights when the checkpoint has them), iteration 0 being the teacher UNet.

Every image set is generated from the same seed (the same initial noise for every model), scored with
`evaluate.evaluate_pipeline` / `score_images` against the real train split.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from digits_data import CAPTION_TEMPLATES, DIGIT_WORDS, GENERIC_CAPTION, caption_for_label, digit_prompts
from evaluate import (
    evaluate_pipeline,
    judge_features_and_logits,
    load_judge,
    real_features,
    save_image_grid,
    teacher_sampler,
)
from judge import DigitsJudge
from safetensors.torch import load_file

import diffusers_onestep  # noqa: F401  (registers the library's classes for diffusers)
from diffusers_onestep.evaluation import fid_from_features, precision_recall, removal_rate
from diffusers_onestep.pipelines.pipeline_onestep import OneStepPipeline
from diffusers_onestep.training_utils import STUDENT_ADAPTER, list_checkpoints


__all__ = [
    "NEGATIVE_WORDINGS",
    "BenchmarkContext",
    "build_context",
    "format_table",
    "load_checkpoint_weights",
    "load_student",
    "main",
    "parse_args",
    "plot_distillation_curves",
    "run_table1",
    "run_table2",
    "run_table3",
    "run_table4",
]

# how a negated digit is written in the negative prompt (the captions use all of these forms)
NEGATIVE_WORDINGS = ("{word}", "{numeral}", "the number {numeral}", "a handwritten digit {word}")
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
# (header, key, format) of the quality columns; fid_matched: FID of 297-image subsets (evaluate.score_images)
METRIC_COLUMNS = (
    ("FID", "fid", ".3f"),
    ("FID@297", "fid_matched", ".3f"),
    ("accuracy", "accuracy", ".3f"),
    ("precision", "precision", ".3f"),
    ("recall", "recall", ".3f"),
)


# ---------------------------------------------------------------------------------------------------- set-up


@dataclass
class BenchmarkContext:
    r"""
    What every table needs: the parsed arguments, the judge, the teacher, the students and the shared caches.

    Args:
        args (`argparse.Namespace`): from `parse_args`.
        judge (`DigitsJudge`): the judge (defines every metric).
        teacher (`StableDiffusionPipeline`): the teacher.
        students (`dict[str, OneStepPipeline]`): name -> final student.
        student_paths (`dict[str, str]`): name -> the student's directory (for its checkpoints).
        results (`dict`): the JSON written to `results.json`, filled table by table.
        cache (`dict`): evaluated configurations, by key (a configuration is evaluated once per run).
    """

    args: argparse.Namespace
    judge: DigitsJudge
    teacher: object
    students: dict[str, OneStepPipeline]
    student_paths: dict[str, str]
    results: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)
    start: float = field(default_factory=time.perf_counter)

    @property
    def grid_dir(self) -> str:
        return os.path.join(self.args.output_dir, "grids")

    def progress(self, message: str) -> None:
        r"""A progress line on stderr (the tables go to stdout)."""
        print(f"[{time.perf_counter() - self.start:7.1f}s] {message}", file=sys.stderr, flush=True)

    def save(self) -> None:
        r"""Writes `results.json` (after every table, so that a stopped run keeps what it measured)."""
        os.makedirs(self.args.output_dir, exist_ok=True)
        with open(os.path.join(self.args.output_dir, "results.json"), "w") as f:
            json.dump(self.results, f, indent=2)


def _share_modules(student: OneStepPipeline, teacher) -> None:
    """Replaces the student's VAE / text encoder / tokenizer by the teacher's objects when their weights are equal."""
    for name in ("vae", "text_encoder"):
        mine, theirs = getattr(student, name), getattr(teacher, name)
        a, b = mine.state_dict(), theirs.state_dict()
        if a.keys() == b.keys() and all(torch.equal(a[k], b[k].to(a[k].dtype)) for k in a):
            student.register_modules(**{name: theirs})
    if student.text_encoder is teacher.text_encoder and student.tokenizer.get_vocab() == teacher.tokenizer.get_vocab():
        student.register_modules(tokenizer=teacher.tokenizer)


def load_checkpoint_weights(unet, checkpoint_dir: str, prefer_ema: bool = True) -> str:
    r"""
    Loads the student weights of a training checkpoint (`training_utils.loop.save_checkpoint`) into `unet` in place.

    The checkpoint's `trainable_0.safetensors` holds the trainable parameters of the first prepared model: the whole
    student UNet (full student), or every adapter of the shared UNet (LoRA student: the `student` adapter is taken and
    renamed to `unet`'s own adapter). `ema.safetensors`, when present and `prefer_ema`, holds the EMA of the student's
    parameters in their `named_parameters` order; the final saved student is the EMA, so the curve uses it too.

    Args:
        unet (`UNet2DConditionModel`): a copy of the student UNet (full), or of the UNet carrying the LoRA student.
        checkpoint_dir (`str`): a `checkpoint-N` folder.
        prefer_ema (`bool`, defaults to True): use the EMA weights when the checkpoint has them.

    Returns:
        `str`: `"ema"` or `"raw"`, the weights loaded.
    """
    state = load_file(os.path.join(checkpoint_dir, "trainable_0.safetensors"))
    params = dict(unet.named_parameters())
    if getattr(unet, "_hf_peft_config_loaded", False):
        adapters = list(unet.peft_config)
        if len(adapters) != 1:
            raise ValueError(f"The LoRA student UNet must carry one adapter, got {adapters}.")
        marker = f".{STUDENT_ADAPTER}."
        state = {k.replace(marker, f".{adapters[0]}."): v for k, v in state.items() if marker in k}
        order = [name for name in params if f".{adapters[0]}." in name]
    else:
        order = list(params)
    if not state or set(state) != set(order):
        raise ValueError(
            f"{checkpoint_dir} does not hold this student's weights: {len(set(order) - set(state))} missing, "
            f"{len(set(state) - set(order))} unexpected (a LoRA checkpoint needs the final LoRA student's adapter)."
        )
    kind = "raw"
    ema_path = os.path.join(checkpoint_dir, "ema.safetensors")
    if prefer_ema and os.path.isfile(ema_path):
        shadow = load_file(ema_path)
        if len(shadow) != len(order):
            raise ValueError(f"{ema_path} has {len(shadow)} tensors; the student has {len(order)} parameters.")
        state = {name: shadow[str(i)] for i, name in enumerate(order)}
        kind = "ema"
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].dtype))
    return kind


def load_student(path: str, teacher, teacher_dir: str, checkpoint_t_init: int = 999) -> tuple[OneStepPipeline, str]:
    r"""
    Loads a student directory written by a training script: a `OneStepPipeline` folder (full student),
    `pytorch_lora_weights.safetensors` + `scheduler/` (LoRA student, on a separate copy of the teacher UNet), or, while
    training is still running, only `checkpoint-N/` folders of a full student (the latest is loaded into the teacher
    UNet, at `checkpoint_t_init`). VAE, text encoder and tokenizer become the teacher's objects when equal.

    Returns:
        `(pipeline, description)`.
    """
    from diffusers_onestep import ConsistencyStudentScheduler

    if os.path.isfile(os.path.join(path, "model_index.json")):
        pipe, what = OneStepPipeline.from_pretrained(path), "full student"
    elif os.path.isfile(os.path.join(path, LORA_WEIGHTS_NAME)):
        config = ConsistencyStudentScheduler.load_config(path, subfolder="scheduler")
        pipe = OneStepPipeline.from_teacher(
            teacher_dir, lora=path, t_init=config["t_init"], input_type=config["input_type"]
        )
        what = "LoRA student"
    elif list_checkpoints(path):
        latest = list_checkpoints(path)[-1]
        pipe = OneStepPipeline.from_teacher(teacher_dir, unet=teacher_dir, t_init=checkpoint_t_init)
        kind = load_checkpoint_weights(pipe.unet, latest)
        what = f"full student from {os.path.basename(latest)} ({kind} weights; training has not saved it yet)"
    else:
        raise ValueError(f"{path} holds no student: no model_index.json, {LORA_WEIGHTS_NAME} or checkpoint-N/.")
    pipe.set_progress_bar_config(disable=True)
    _share_modules(pipe, teacher)
    return pipe, f"{what}, t_init {pipe.scheduler.config.t_init}"


def build_context(args: argparse.Namespace) -> BenchmarkContext:
    r"""Loads the judge, the teacher and the students named in `args`."""
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(args.seed)
    judge = load_judge(args.judge_dir)
    teacher = StableDiffusionPipeline.from_pretrained(args.teacher_dir, safety_checker=None, use_safetensors=True)
    teacher.set_progress_bar_config(disable=True)
    students, paths, descriptions = {}, {}, {}
    for entry in args.students:
        name, path = entry.split("=", 1)
        students[name], descriptions[name] = load_student(path, teacher, args.teacher_dir, args.checkpoint_t_init)
        paths[name] = path
    ctx = BenchmarkContext(args, judge, teacher, students, paths)
    ctx.results["config"] = {
        "command": _command(args),
        **vars(args),
        "students_loaded": descriptions,
        "torch_threads": torch.get_num_threads(),
    }
    return ctx


# ---------------------------------------------------------------------------------------------------- helpers


def _command(args: argparse.Namespace) -> str:
    return "python examples/digits/benchmark.py " + " ".join(shlex.quote(a) for a in args.argv)


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, str):
        return value
    return format(value, spec)


def format_table(title: str, columns: Sequence[tuple[str, str, str]], rows: Sequence[dict], notes=()) -> str:
    r"""
    Aligned text table.

    Args:
        title (`str`): printed above the table.
        columns (`Sequence[tuple[str, str, str]]`): `(header, key, format spec)`; strings are left-aligned, numbers
            right-aligned; a missing value prints as `-`.
        rows (`Sequence[dict]`): one dict per row.
        notes (`Sequence[str]`): lines printed under the table.
    """
    cells = [[_fmt(row.get(key), spec) for _, key, spec in columns] for row in rows]
    widths = [max([len(header)] + [len(c[i]) for c in cells]) for i, (header, _, _) in enumerate(columns)]
    left = [all(isinstance(row.get(key), str) or row.get(key) is None for row in rows) for _, key, _ in columns]

    def line(values):
        return "  ".join(v.ljust(w) if lft else v.rjust(w) for v, w, lft in zip(values, widths, left)).rstrip()

    out = [title, line([h for h, _, _ in columns]), "  ".join("-" * w for w in widths)]
    out += [line(c) for c in cells]
    out += [f"  {note}" for note in notes]
    return "\n".join(out) + "\n"


def _evaluate(
    ctx: BenchmarkContext,
    key: str,
    pipe_callable: Callable,
    nfe: float | None,
    prompts: Sequence[str] | None = None,
    n_per_prompt: int | None = None,
    labels: Sequence[int] | None = None,
    return_images: bool = False,
):
    """`evaluate_pipeline` with the run's judge, seed and batch size; saves a grid; cached by `key` (metrics only)."""
    if key in ctx.cache and not return_images:
        return ctx.cache[key]
    prompts = digit_prompts() if prompts is None else list(prompts)
    n = ctx.args.n_per_prompt if n_per_prompt is None else n_per_prompt
    ctx.progress(f"{key}: {len(prompts) * n} images")
    metrics = evaluate_pipeline(
        pipe_callable, prompts, n, labels, judge=ctx.judge, batch_size=ctx.args.batch_size, seed=ctx.args.seed,
        return_images=True,
    )  # fmt: skip
    images, _ = metrics.pop("images"), metrics.pop("labels")
    os.makedirs(ctx.grid_dir, exist_ok=True)
    grid = images.unflatten(0, (len(prompts), n))[:, :10].flatten(0, 1)
    save_image_grid(grid, os.path.join(ctx.grid_dir, f"{key}.png"), nrow=min(10, n))
    if nfe is not None:
        metrics["nfe"] = nfe
    ctx.cache[key] = metrics
    return (metrics, images) if return_images else metrics


def _student_callable(pipe: OneStepPipeline, steps: int = 1, nfe_log: list | None = None, **call_kwargs):
    """A `pipe_callable` for `evaluate_pipeline`; `call_kwargs` may be callables of the batch's prompts."""

    def pipe_callable(prompts: list[str], generator: torch.Generator) -> torch.Tensor:
        kwargs = {k: v(prompts) if callable(v) else v for k, v in call_kwargs.items()}
        out = pipe(prompts, num_inference_steps=steps, generator=generator, output_type="pt", **kwargs)
        if nfe_log is not None:
            nfe_log.append(out.nfe)
        return out.images

    return pipe_callable


def _teacher(ctx: BenchmarkContext, steps: int, guidance_scale: float, n_per_prompt: int | None = None) -> dict:
    """The teacher with DPM-Solver++ at `steps` steps and `guidance_scale` (1 = no CFG), cached."""
    pipe_callable, nfe = teacher_sampler(ctx.teacher, f"dpm++:{steps}", guidance_scale)
    n = ctx.args.n_per_prompt if n_per_prompt is None else n_per_prompt
    suffix = "" if n == ctx.args.n_per_prompt else f"_n{n}"
    key = f"teacher_dpm++{steps}_cfg{guidance_scale:g}{suffix}"
    return _evaluate(ctx, key, pipe_callable, nfe, n_per_prompt=n)


def _student(ctx: BenchmarkContext, name: str, steps: int) -> dict:
    nfe_log = []
    metrics = _evaluate(ctx, f"{name}_{steps}step", _student_callable(ctx.students[name], steps, nfe_log), None)
    metrics.setdefault("nfe", nfe_log[0] if nfe_log else steps)
    return metrics


def _guidance_label(guidance_scale: float) -> str:
    return "no CFG" if guidance_scale <= 1 else f"CFG {guidance_scale:g}"


# ---------------------------------------------------------------------------------------------------- table 1


def run_table1(ctx: BenchmarkContext) -> dict:
    r"""Teacher (DPM-Solver++, picked guidance) at 1..25 steps vs every student at 1, 2, 4 steps; FID floor."""
    args = ctx.args
    train_features, test_features = real_features("train", ctx.judge), real_features("test", ctx.judge)
    floor_precision, floor_recall = precision_recall(train_features, test_features)
    floor = {
        "fid": fid_from_features(test_features, train_features),
        "precision": floor_precision,
        "recall": floor_recall,
        "n": len(test_features),
    }

    # 1. the guidance scale: digits-FID over --guidance_scales at --guidance_select_steps, with fewer images
    selection = []
    for g in args.guidance_scales:
        metrics = _teacher(ctx, args.guidance_select_steps, g, args.guidance_select_n_per_prompt)
        selection.append({"guidance_scale": g, **metrics})
    best = min(selection, key=lambda r: r["fid"])
    cfg_rows = [r for r in selection if r["guidance_scale"] > 1]
    best_cfg = min(cfg_rows, key=lambda r: r["fid"])["guidance_scale"] if cfg_rows else None
    sweep_g = best["guidance_scale"]

    # 2. the step sweep at that scale, and the 25-step teacher with the other choice (CFG or not)
    reference_steps = max(args.teacher_steps)
    rows = []
    for steps in args.teacher_steps:
        rows.append({"model": "teacher", "sampler": f"DPM++ {steps}", "guidance": _guidance_label(sweep_g),
                     "steps": steps, "guidance_scale": sweep_g, **_teacher(ctx, steps, sweep_g)})  # fmt: skip
    other_g = 1.0 if sweep_g > 1 else best_cfg
    if other_g is not None:
        rows.append({"model": "teacher", "sampler": f"DPM++ {reference_steps}", "guidance": _guidance_label(other_g),
                     "steps": reference_steps, "guidance_scale": other_g,
                     **_teacher(ctx, reference_steps, other_g)})  # fmt: skip
    finals = [r for r in rows if r["steps"] == reference_steps]
    reference = min(finals, key=lambda r: r["fid"])
    for name in ctx.students:
        for steps in args.student_steps:
            rows.append({"model": name, "sampler": f"student {steps}", "guidance": "-", "steps": steps,
                         "guidance_scale": None, **_student(ctx, name, steps)})  # fmt: skip
    for row in rows:
        row["speed_ratio"] = row["images_per_second"] / reference["images_per_second"]
    no_cfg = [r for r in finals if r["guidance_scale"] <= 1]
    with_cfg = [r for r in finals if r["guidance_scale"] > 1]
    statement = (
        f"reference: the {reference_steps}-step teacher {_guidance_label(reference['guidance_scale'])} "
        f"(FID {reference['fid']:.3f})"
    )
    if no_cfg and with_cfg:
        better = "without" if reference["guidance_scale"] <= 1 else "with"
        statement += (
            f": {better} CFG is better at {reference_steps} steps (no CFG {no_cfg[0]['fid']:.3f} vs "
            f"{_guidance_label(with_cfg[0]['guidance_scale'])} {with_cfg[0]['fid']:.3f})"
        )
    result = {
        "floor": floor,
        "guidance_selection": {
            "steps": args.guidance_select_steps,
            "n_per_prompt": args.guidance_select_n_per_prompt,
            "rows": selection,
            "chosen": sweep_g,
            "best_cfg": best_cfg,
        },
        "rows": rows,
        "reference": {
            "steps": reference_steps,
            "guidance_scale": reference["guidance_scale"],
            **{k: reference[k] for k in ("fid", "fid_matched", "images_per_second") if k in reference},
        },
        "statement": statement,
    }
    ctx.results["table1"] = result
    ctx.results["teacher_guidance_scale"] = sweep_g

    n = args.n_per_prompt * 10
    text = format_table(
        f"Guidance scale of the teacher (DPM-Solver++ {args.guidance_select_steps} steps, "
        f"N = {args.guidance_select_n_per_prompt * 10}; picked by digits-FID)",
        [("guidance", "label", "s"), *METRIC_COLUMNS, ("NFE", "nfe", "d")],
        [{**r, "label": _guidance_label(r["guidance_scale"])} for r in selection],
        [f"picked: {_guidance_label(sweep_g)}" + (f"; best CFG scale: {best_cfg:g}" if best_cfg else "")],
    )  # fmt: skip
    text += "\n" + format_table(
        f"Table 1: quality and speed (N = {n} per row, balanced over the 10 digit prompts; digits-FID against the "
        f"{len(train_features)} real train images)",
        [("model", "model", "s"), ("sampler", "sampler", "s"), ("guidance", "guidance", "s"), *METRIC_COLUMNS,
         ("NFE", "nfe", "d"), ("images/s", "images_per_second", ".1f"), ("speed vs ref", "speed_ratio", ".2f")],
        rows,
        [f"FID floor (real test {floor['n']} vs real train): {floor['fid']:.3f} "
         f"(precision {floor['precision']:.3f}, recall {floor['recall']:.3f}); FID@297 = mean FID of 297-image "
         "subsets (evaluate.subset_fid), the size of the floor's test set: compare it with the floor",
         statement + "; speed = images/s / the reference's, timed in this process"],
    )  # fmt: skip
    print(text, flush=True)
    ctx.save()
    return result


# ---------------------------------------------------------------------------------------------------- table 2


def _other_digits(digit: int) -> list[int]:
    return [d for d in range(10) if d != digit]


def _nasa_scores(ctx: BenchmarkContext, images: torch.Tensor, negated: torch.Tensor) -> dict:
    """Removal rate and the per-negated-digit digits-FID against the real train images of the other nine digits."""
    features, logits = judge_features_and_logits(images, ctx.judge)
    fids = [
        fid_from_features(features[negated == d], real_features("train", ctx.judge, _other_digits(d)))
        for d in range(10)
    ]
    return {"removal_rate": removal_rate(logits, negated), "fid_other9": sum(fids) / len(fids), "fid_per_digit": fids}


def _nasa_floor(ctx: BenchmarkContext, n: int) -> tuple[float, int]:
    """The same FID for real test images of the other nine digits (n per negated digit, fixed subsample)."""
    fids, sizes, generator = [], [], torch.Generator().manual_seed(ctx.args.seed)
    for d in range(10):
        test = real_features("test", ctx.judge, _other_digits(d))
        test = test[torch.randperm(len(test), generator=generator)[: max(n, 2)]]
        fids.append(fid_from_features(test, real_features("train", ctx.judge, _other_digits(d))))
        sizes.append(len(test))
    return sum(fids) / len(fids), min(sizes)


def _negative(wording: str, digit: int) -> str:
    return wording.format(word=DIGIT_WORDS[digit], numeral=str(digit))


def _nasa_run(
    ctx: BenchmarkContext,
    name: str,
    wording: str,
    key: str,
    steps: int = 1,
    n_per_prompt: int | None = None,
    **call_kwargs,
) -> dict:
    """The generic prompt with each negated digit in turn; `call_kwargs` select NASA or CFG."""
    negatives = [_negative(wording, d) for d in range(10)]
    nfe_log = []

    # evaluate_pipeline's "prompts" are the negatives (labels: the negated digits); the prompt is the generic caption
    def call(negative_batch: list[str], generator: torch.Generator) -> torch.Tensor:
        out = ctx.students[name](
            [GENERIC_CAPTION] * len(negative_batch), negative_prompt=list(negative_batch), num_inference_steps=steps,
            generator=generator, output_type="pt", **call_kwargs,
        )  # fmt: skip
        nfe_log.append(out.nfe)
        return out.images

    if key in ctx.cache:
        return ctx.cache[key]
    metrics, images = _evaluate(
        ctx, key, call, None, prompts=negatives, n_per_prompt=n_per_prompt, labels=range(10), return_images=True
    )
    negated = torch.arange(10).repeat_interleave(len(images) // 10)
    metrics.update(_nasa_scores(ctx, images, negated), nfe=nfe_log[0])
    for unused in ("fid", "accuracy", "precision", "recall"):  # against all digits: not what table 2 measures
        metrics.pop(unused, None)
    ctx.cache[key] = metrics
    return metrics


def _best_removal(rows: list[dict], fid_limit: float) -> tuple[dict, bool]:
    """
    The row with the largest removal rate among those whose other-nine FID is at most `fid_limit` (the FID without a
    negative), and whether one qualified; otherwise the row with the lowest FID.
    """
    admissible = [r for r in rows if r["fid_other9"] <= fid_limit]
    if admissible:
        return max(admissible, key=lambda r: (r["removal_rate"], -r["fid_other9"])), True
    return min(rows, key=lambda r: r["fid_other9"]), False


def run_table2(ctx: BenchmarkContext) -> dict:
    r"""NASA removal rate and other-nine FID per student and scale, beside output-space CFG with the negative."""
    args = ctx.args
    names = list(ctx.students)
    result = {"prompt": GENERIC_CAPTION, "students": {}}

    # the negative's wording: the one that removes most at --wording_nasa_scale, for the first student
    wording_rows = []
    for wording in NEGATIVE_WORDINGS:
        key = f"{names[0]}_wording_{wording.replace('{', '').replace('}', '').replace(' ', '_')}"
        metrics = _nasa_run(ctx, names[0], wording, key, n_per_prompt=args.guidance_select_n_per_prompt,
                            nasa_scale=args.wording_nasa_scale)  # fmt: skip
        wording_rows.append({"wording": wording, "example": _negative(wording, 7), **metrics})
    wording = max(wording_rows, key=lambda r: r["removal_rate"])["wording"]
    result["wording_selection"] = {"student": names[0], "nasa_scale": args.wording_nasa_scale, "rows": wording_rows,
                                   "chosen": wording}  # fmt: skip
    floor, floor_n = _nasa_floor(ctx, args.n_per_prompt)
    result["fid_other9_floor"] = {"fid": floor, "n_per_negated_digit": floor_n}
    text = format_table(
        f"Negative-prompt wording (student {names[0]}, NASA scale {args.wording_nasa_scale:g}, "
        f"N = {args.guidance_select_n_per_prompt * 10}; picked by removal rate)",
        [("wording", "wording", "s"), ("e.g.", "example", "s"), ("removal", "removal_rate", ".3f"),
         ("FID other 9", "fid_other9", ".2f")],
        wording_rows, [f"picked: {wording!r}"],
    )  # fmt: skip

    for name in names:
        rows = []
        for alpha in args.nasa_scales:
            slug = f"{name}_nasa{alpha:g}"
            metrics = _nasa_run(ctx, name, wording, slug, nasa_scale=alpha)
            rows.append({"method": "NASA", "scale": alpha, "steps": 1, **metrics})
        baseline = rows[0]["images_per_second"]
        # best: the largest removal that keeps the other-nine FID no worse than without the negative (scale 0)
        fid_limit = rows[0]["fid_other9"] if rows[0]["scale"] == 0 else math.inf
        best, best_ok = _best_removal([r for r in rows if r["scale"] > 0] or rows, fid_limit)
        largest = max(rows, key=lambda r: (r["removal_rate"], -r["fid_other9"]))
        metrics = _nasa_run(ctx, name, wording, f"{name}_nasa{best['scale']:g}_2step", steps=2,
                            nasa_scale=best["scale"])  # fmt: skip
        rows.append({"method": "NASA", "scale": best["scale"], "steps": 2, **metrics})
        for g in args.nasa_cfg_scales:
            metrics = _nasa_run(ctx, name, wording, f"{name}_cfg{g:g}", guidance_scale=g, nasa_scale=0.0)
            rows.append({"method": "CFG (negative = uncond.)", "scale": g, "steps": 1, **metrics})
        for row in rows:
            row["speed_ratio"] = row["images_per_second"] / baseline
        cfg = [r for r in rows if r["method"] != "NASA"]
        best_cfg, best_cfg_ok = _best_removal(cfg, fid_limit) if cfg else (None, False)
        keys = ("scale", "removal_rate", "fid_other9")
        result["students"][name] = {
            "rows": rows,
            "best_nasa": {**{k: best[k] for k in keys}, "fid_no_worse": best_ok},
            "largest_nasa_removal": {k: largest[k] for k in keys},
            "best_cfg": None if best_cfg is None else {**{k: best_cfg[k] for k in keys}, "fid_no_worse": best_cfg_ok},
        }
        text += "\n" + format_table(
            f"Table 2 ({name}): prompt {GENERIC_CAPTION!r}, negative {wording!r} for each digit in turn "
            f"(N = {args.n_per_prompt * 10} per row, {args.n_per_prompt} per negated digit)",
            [("method", "method", "s"), ("scale", "scale", "g"), ("steps", "steps", "d"), ("NFE", "nfe", "d"),
             ("removal", "removal_rate", ".3f"), ("FID other 9", "fid_other9", ".2f"),
             ("speed vs scale 0", "speed_ratio", ".2f")],
            rows,
            ["removal = share of images the judge does NOT classify as the negated digit (0.9 if the negative is "
             "ignored and the 10 digits are equally likely)",
             f"FID other 9 = digits-FID against the real train images of the nine other digits, per negated digit "
             f"({args.n_per_prompt} images each), averaged; the same for {floor_n} real test images per digit: "
             f"{floor:.2f}",
             f"best = the largest removal whose FID other 9 is no worse than without a negative (scale 0): NASA "
             f"{best['scale']:g}" + ("" if best_ok else " (none qualifies: the lowest FID)")
             + (f", CFG {best_cfg['scale']:g}" + ("" if best_cfg_ok else " (none qualifies: the lowest FID)")
                if best_cfg else "")
             + f"; the 2-step NASA row uses NASA {best['scale']:g}",
             "NASA costs 1 UNet evaluation per step (+ one attention per cross-attention layer), CFG 2; the 2-step "
             "NASA row spends CFG's 2 NFE"],
        )  # fmt: skip
    ctx.results["table2"] = result
    print(text, flush=True)
    ctx.save()
    return result


# ---------------------------------------------------------------------------------------------------- table 3


def _adaptive_student_name(ctx: BenchmarkContext) -> str:
    if ctx.args.adaptive_student:
        return ctx.args.adaptive_student
    return "pgsb" if "pgsb" in ctx.students else next(iter(ctx.students))


def run_table3(ctx: BenchmarkContext) -> dict:
    r"""Adaptive collaboration (refine) at oracle percentiles k, beside the student / teacher alone at equal NFE."""
    from diffusers import DPMSolverMultistepScheduler
    from oracle import DigitsOracle, load_or_train_oracle

    from diffusers_onestep.pipelines.pipeline_adaptive_collab import AdaptiveCollabPipeline

    args = ctx.args
    name = _adaptive_student_name(ctx)
    guidance = ctx.results.get("teacher_guidance_scale", args.teacher_guidance_scale)
    teacher = ctx.teacher
    ctx.progress(f"table 3: oracle, calibration on {name}")
    oracle = DigitsOracle(load_or_train_oracle(args.oracle_dir), batch_size=1000)
    pipe = AdaptiveCollabPipeline.from_pipelines(
        ctx.students[name],
        type(teacher).from_pipe(teacher, scheduler=DPMSolverMultistepScheduler.from_config(teacher.scheduler.config)),
        oracle=oracle,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    # calibration: every caption template of every digit, with a seed the evaluation never uses
    calibration_prompts = [caption_for_label(d, t) for d in range(10) for t in range(len(CAPTION_TEMPLATES))]
    calibration_scores = pipe.calibrate(
        calibration_prompts, batch_size=max(1, args.batch_size // args.calibration_images_per_prompt),
        num_images_per_prompt=args.calibration_images_per_prompt,
        generator=torch.Generator().manual_seed(args.seed + 1000),
    )  # fmt: skip
    call = {"strategy": "refine", "refine_strength": args.adaptive_strength, "teacher_steps": args.adaptive_teacher_steps,
            "teacher_guidance_scale": guidance}  # fmt: skip

    rows = []
    for k in args.percentiles:
        log = {"nfe": [], "refined": []}

        def adaptive_callable(prompts, generator, k=k, log=log):
            out = pipe(prompts, percentile=k, generator=generator, output_type="pt", **call)
            log["nfe"] += out.nfe
            log["refined"] += out.refined.tolist()
            return out.images

        metrics = _evaluate(ctx, f"adaptive_{name}_k{k:g}", adaptive_callable, None)
        average_nfe = sum(log["nfe"]) / len(log["nfe"])
        rows.append({"method": f"adaptive k={k:g}", "k": k, **metrics, "nfe": average_nfe,
                     "refined_share": sum(log["refined"]) / len(log["refined"]),
                     "threshold": pipe.get_threshold(k)})  # fmt: skip

    # the student alone and the teacher alone at about each adaptive row's average NFE
    per_step = 2 if guidance > 1 else 1
    comparisons = []
    for row in rows:
        student_steps = max(1, round(row["nfe"]))
        teacher_steps = max(1, round(row["nfe"] / per_step))
        for method, metrics in (
            (f"{name} {student_steps} step{'s' * (student_steps > 1)}", _student(ctx, name, student_steps)),
            (f"teacher DPM++ {teacher_steps} {_guidance_label(guidance)}", _teacher(ctx, teacher_steps, guidance)),
        ):
            comparisons.append({"method": method, "for_k": row["k"], **metrics})
    student_1 = _student(ctx, name, 1)
    base = [{"method": f"{name} 1 step (k=0)", **student_1}]
    result = {
        "student": name,
        "oracle": {"classifier": "DigitsJudge(16, 32; 64-d), seed 1, train split", "score": "p(prompted digit)"},
        "calibration": {"prompts": len(calibration_prompts), "images": len(calibration_scores),
                        "seed": args.seed + 1000, "percentiles": pipe.calibration["percentiles"]},
        "settings": call,
        "rows": rows,
        "comparisons": comparisons,
    }  # fmt: skip
    ctx.results["table3"] = result
    text = format_table(
        f"Table 3: adaptive collaboration, student {name} + oracle + teacher refine (SDEdit strength "
        f"{args.adaptive_strength:g}, {args.adaptive_teacher_steps} DPM++ steps, {_guidance_label(guidance)}); "
        f"N = {args.n_per_prompt * 10} per row",
        [("method", "method", "s"), ("refined", "refined_share", ".2f"), ("avg NFE", "nfe", ".2f"), *METRIC_COLUMNS,
         ("images/s", "images_per_second", ".1f")],
        base + [r for row in rows for r in [row] + [c for c in comparisons if c["for_k"] == row["k"]]],
        [f"oracle: a second classifier (not the judge), score = its softmax probability of the prompted digit; "
         f"percentiles calibrated on {len(calibration_scores)} student images of all {len(CAPTION_TEMPLATES)} caption "
         f"templates, seed {args.seed + 1000}",
         "under each k: the student alone and the teacher alone at the step count whose NFE is closest to its "
         "average NFE"],
    )  # fmt: skip
    print(text, flush=True)
    ctx.save()
    return result


# ---------------------------------------------------------------------------------------------------- table 4


def plot_distillation_curves(curves: dict, path: str, reference_fid: float | None = None) -> str | None:
    r"""
    Plots digits-FID (log scale) and accuracy against training iteration, one line per student, with the teacher's
    reference FID (same N) as a dashed line (matplotlib, Agg backend). Returns the path, or `None` when matplotlib is
    not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FormatStrFormatter
    except ImportError:
        return None
    figure, (ax_fid, ax_acc) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for name, points in curves.items():
        iterations = [p["iteration"] for p in points]
        ax_fid.plot(iterations, [p["fid"] for p in points], marker="o", label=name)
        ax_acc.plot(iterations, [p["accuracy"] for p in points], marker="o", label=name)
    if reference_fid is not None:
        ax_fid.axhline(reference_fid, color="grey", linestyle="--", label="teacher (reference)")
    ax_fid.set(xlabel="training iteration", ylabel="digits-FID, 1 step (log scale)", yscale="log", title="digits-FID")
    for axis in (ax_fid.yaxis,):
        axis.set_major_formatter(FormatStrFormatter("%g"))
        axis.set_minor_formatter(FormatStrFormatter("%g"))
    ax_acc.set(xlabel="training iteration", ylabel="prompt accuracy, 1 step", title="accuracy")
    ax_acc.set_ylim(top=1.002)
    for ax in (ax_fid, ax_acc):
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def run_table4(ctx: BenchmarkContext) -> dict:
    r"""digits-FID / accuracy of every `checkpoint-N` of every student (1 step), and the PNG plot."""
    args = ctx.args
    n = args.curve_n_per_prompt or args.n_per_prompt
    curves, rows = {}, []
    for name, student in ctx.students.items():
        points = []
        init = OneStepPipeline(student.vae, student.text_encoder, student.tokenizer, ctx.teacher.unet,
                               student.scheduler)  # fmt: skip
        init.set_progress_bar_config(disable=True)
        metrics = _evaluate(ctx, f"init_t{student.scheduler.config.t_init}_n{n}", _student_callable(init), 1,
                            n_per_prompt=n)  # fmt: skip
        points.append({"iteration": 0, "checkpoint": "teacher UNet", "weights": "init", **metrics})
        for checkpoint in list_checkpoints(ctx.student_paths[name]):
            unet = copy.deepcopy(student.unet)
            kind = load_checkpoint_weights(unet, checkpoint, prefer_ema=not args.raw_checkpoint_weights)
            pipe = OneStepPipeline(student.vae, student.text_encoder, student.tokenizer, unet, student.scheduler)
            pipe.set_progress_bar_config(disable=True)
            label = os.path.basename(checkpoint)
            metrics = _evaluate(ctx, f"{name}_{label}_n{n}", _student_callable(pipe), 1, n_per_prompt=n)
            points.append({"iteration": int(label.split("-")[1]), "checkpoint": label, "weights": kind, **metrics})
            del pipe, unet
        curves[name] = points
        rows += [{"student": name, **p} for p in points]
    table1 = ctx.results.get("table1", {})
    reference = table1.get("reference", {}).get("fid")
    floor = table1.get("floor", {}).get("fid")
    path = plot_distillation_curves(curves, os.path.join(args.output_dir, "distillation_curves.png"), reference)
    result = {"n_per_prompt": n, "curves": curves, "plot": path}
    ctx.results["table4"] = result
    notes = [f"plot: {path}" if path else "plot: not drawn (matplotlib is not installed)"]
    if reference is not None:
        notes.append(f"teacher reference FID {reference:.3f}, floor {floor:.3f}")
    text = format_table(
        f"Table 4: distillation curves, 1-step digits-FID and accuracy per checkpoint (N = {n * 10})",
        [("student", "student", "s"), ("iteration", "iteration", "d"), ("checkpoint", "checkpoint", "s"),
         ("weights", "weights", "s"), *METRIC_COLUMNS],
        rows, notes,
    )  # fmt: skip
    print(text, flush=True)
    ctx.save()
    return result


# ---------------------------------------------------------------------------------------------------- main


def _headline(ctx: BenchmarkContext) -> dict:
    r"""The `name: value` figures printed last."""
    results, out = ctx.results, {}
    if "table1" in results:
        t1 = results["table1"]
        out["fid_floor_test_vs_train"] = t1["floor"]["fid"]
        out["teacher_guidance_scale"] = results["teacher_guidance_scale"]
        out["teacher_reference_guidance_scale"] = t1["reference"]["guidance_scale"]
        for row in t1["rows"]:
            if row["model"] == "teacher":
                tag = "nocfg" if row["guidance_scale"] <= 1 else f"cfg{row['guidance_scale']:g}"
                out[f"teacher_{row['steps']}step_{tag}_fid"] = row["fid"]
        out[f"teacher_{t1['reference']['steps']}step_fid"] = t1["reference"]["fid"]
        if "fid_matched" in t1["reference"]:
            out[f"teacher_{t1['reference']['steps']}step_fid_matched"] = t1["reference"]["fid_matched"]
        for row in t1["rows"]:
            if row["model"] != "teacher":
                out[f"{row['model']}_{row['steps']}step_fid"] = row["fid"]
                if row["steps"] == 1:
                    if "fid_matched" in row:
                        out[f"{row['model']}_1step_fid_matched"] = row["fid_matched"]
                    out[f"{row['model']}_1step_accuracy"] = row["accuracy"]
                    out[f"{row['model']}_1step_speed_vs_teacher"] = row["speed_ratio"]
    if "table2" in results:
        best = None
        for name, student in results["table2"]["students"].items():
            out[f"{name}_nasa_best_removal_rate"] = student["best_nasa"]["removal_rate"]
            out[f"{name}_nasa_best_scale"] = student["best_nasa"]["scale"]
            out[f"{name}_nasa_best_fid_other9"] = student["best_nasa"]["fid_other9"]
            out[f"{name}_nasa_largest_removal_rate"] = student["largest_nasa_removal"]["removal_rate"]
            out[f"{name}_nasa_largest_removal_scale"] = student["largest_nasa_removal"]["scale"]
            if student["best_cfg"] is not None:
                out[f"{name}_cfg_best_removal_rate"] = student["best_cfg"]["removal_rate"]
                out[f"{name}_cfg_best_scale"] = student["best_cfg"]["scale"]
                out[f"{name}_cfg_best_fid_other9"] = student["best_cfg"]["fid_other9"]
            if best is None or student["best_nasa"]["removal_rate"] > best:
                best = student["best_nasa"]["removal_rate"]
        out["nasa_best_removal_rate"] = best
    if "table3" in results:
        for row in results["table3"]["rows"]:
            out[f"adaptive_k{row['k']:g}_fid"] = row["fid"]
            out[f"adaptive_k{row['k']:g}_average_nfe"] = row["nfe"]
    if "table4" in results:
        for name, points in results["table4"]["curves"].items():
            best = min(points, key=lambda p: p["fid"])
            out[f"{name}_curve_best_fid"] = best["fid"]
            out[f"{name}_curve_best_iteration"] = best["iteration"]
    out["seconds"] = time.perf_counter() - ctx.start
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    r"""The benchmark's command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher_dir", required=True, help="the teacher (a StableDiffusionPipeline directory)")
    parser.add_argument("--judge_dir", required=True, help="the judge (judge.py)")
    parser.add_argument(
        "--students",
        nargs="+",
        required=True,
        metavar="NAME=PATH",
        help="student directories (OneStepPipeline, LoRA student, or checkpoint-N/ only)",
    )
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--n_per_prompt", type=int, default=100, help="images per digit (N = 10x) of every row")
    parser.add_argument("--tables", type=int, nargs="+", default=[1, 2, 3, 4], choices=[1, 2, 3, 4])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=250, help="images per pipeline call")
    parser.add_argument("--num_threads", type=int, default=1, help="torch threads (1 is fastest on shared cores)")
    # table 1
    parser.add_argument("--teacher_steps", type=int, nargs="+", default=[1, 2, 4, 8, 25])
    parser.add_argument("--student_steps", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument(
        "--guidance_scales",
        type=float,
        nargs="+",
        default=[1.0, 1.25, 1.5, 2.0],
        help="teacher guidance scales compared (1 = no CFG)",
    )
    parser.add_argument("--guidance_select_steps", type=int, default=8)
    parser.add_argument(
        "--guidance_select_n_per_prompt",
        type=int,
        default=None,
        help="images per digit of the guidance and wording selections (default n_per_prompt / 4)",
    )
    parser.add_argument(
        "--teacher_guidance_scale",
        type=float,
        default=1.0,
        help="the teacher's guidance in tables 3-4 when table 1 is not run",
    )
    # table 2
    parser.add_argument("--nasa_scales", type=float, nargs="+", default=[0.0, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0])
    parser.add_argument("--nasa_cfg_scales", type=float, nargs="+", default=[1.5, 2.0, 3.0])
    parser.add_argument("--wording_nasa_scale", type=float, default=1.0)
    # table 3
    parser.add_argument("--adaptive_student", default=None, help="default: pgsb if given, else the first student")
    parser.add_argument("--percentiles", type=float, nargs="+", default=[10, 30, 50, 70, 90])
    parser.add_argument("--adaptive_strength", type=float, default=0.5)
    parser.add_argument("--adaptive_teacher_steps", type=int, default=4)
    parser.add_argument(
        "--calibration_images_per_prompt",
        type=int,
        default=None,
        help="per caption (10 digits x 5 templates); default max(2, n_per_prompt / 10)",
    )
    parser.add_argument("--oracle_dir", default=None, help="load (or save) the oracle here; trained if absent")
    # table 4
    parser.add_argument("--curve_n_per_prompt", type=int, default=None, help="default n_per_prompt")
    parser.add_argument("--raw_checkpoint_weights", action="store_true", help="ignore the checkpoints' EMA weights")
    parser.add_argument("--checkpoint_t_init", type=int, default=999,
                        help="t_init of a student given as checkpoint-N/ folders only")  # fmt: skip
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.n_per_prompt < 2:
        parser.error("--n_per_prompt must be >= 2 (table 2 computes a FID per negated digit)")
    if args.guidance_select_n_per_prompt is None:
        args.guidance_select_n_per_prompt = max(2, args.n_per_prompt // 4)
    if args.calibration_images_per_prompt is None:
        args.calibration_images_per_prompt = max(2, args.n_per_prompt // 10)
    for entry in args.students:
        if "=" not in entry:
            parser.error(f"--students takes NAME=PATH entries, got {entry!r}")
    if args.guidance_select_steps not in args.teacher_steps:
        parser.error("--guidance_select_steps must be one of --teacher_steps")
    return args


def main(argv: list[str] | None = None) -> dict:
    import transformers
    from diffusers.utils import logging as diffusers_logging

    args = parse_args(argv)
    torch.set_num_threads(args.num_threads)
    diffusers_logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    header = ["digits benchmark", f"command: {_command(args)}"]
    header += [f"{k}: {v}" for k, v in vars(args).items() if k != "argv"]
    print("\n".join(header) + "\n", flush=True)
    ctx = build_context(args)
    for name, description in ctx.results["config"]["students_loaded"].items():
        print(f"student {name}: {description}")
    print(flush=True)
    for number, run in ((1, run_table1), (2, run_table2), (3, run_table3), (4, run_table4)):
        if number in args.tables:
            run(ctx)
    ctx.results["headline"] = _headline(ctx)
    ctx.save()
    for name, value in ctx.results["headline"].items():
        print(f"{name}: {value:.4f}" if isinstance(value, float) else f"{name}: {value}")
    print(f"outputs: {args.output_dir}", flush=True)
    return ctx.results


if __name__ == "__main__":
    main()
