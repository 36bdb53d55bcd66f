"""Distillation curves of digits students, against iterations and against training minutes, for any backbone.

    OMP_NUM_THREADS=1 python examples/digits/curves.py --teacher_dir examples/digits/checkpoints/teacher \
        --judge_dir examples/digits/checkpoints/judge --output_dir OUT --n_per_prompt 50 \
        --students pgsb=/work/digits_artifacts/students/pgsb_control sid=/work/digits_artifacts/students/sid \
        --logs pgsb=/work/digits_artifacts/pgsb_control.log sid=/work/digits_artifacts/sid.log

For every `checkpoint-N/` of every student (iteration 0 is the teacher's own network), the digits-FID (1 step, or
`--num_inference_steps`) and
prompt accuracy of the backbone's one-step pipeline (`OneStepPipeline`, `OneStepXLPipeline`, `OneStepPixArtPipeline`,
chosen from the teacher's class) at the student's own `t_init` / `input_type` (read from its saved `scheduler/`, else
`--t_init` on pure noise), against the teacher at DPM-Solver++ 25 steps with CFG at the same N. With `--logs` (the
training runs' console logs), each checkpoint also gets the training wall time at its step, read from the progress
bar's elapsed time, and a second plot shows FID against minutes. Prints `name: value` lines, writes `curves.json`,
`curves.png` (`benchmark.plot_distillation_curves`) and `curves_minutes.png`. Checkpoint weights are loaded with
`benchmark.load_checkpoint_weights` (the EMA weights when the checkpoint has them).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import torch
from diffusers import DiffusionPipeline


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchmark import load_checkpoint_weights, plot_distillation_curves  # noqa: E402
from digits_data import digit_prompts  # noqa: E402
from evaluate import evaluate_pipeline, load_judge, teacher_sampler  # noqa: E402

from diffusers_onestep import ConsistencyStudentScheduler  # noqa: E402
from diffusers_onestep.training_utils import list_checkpoints, training_backbone  # noqa: E402


_ELAPSED = re.compile(r"\|\s*(\d+)/\d+ \[(?:(\d+):)?(\d+):(\d+)")


def elapsed_minutes(log_path: str) -> dict[int, float]:
    r"""Step -> training wall minutes at that step, from the tqdm progress bar in a training log."""
    with open(log_path, errors="replace") as file:
        text = file.read()
    minutes = {}
    for step, hours, mins, secs in _ELAPSED.findall(text):
        minutes[int(step)] = int(hours or 0) * 60 + int(mins) + int(secs) / 60
    return minutes


def plot_minutes(curves: dict, path: str, reference_fid: float, xlabel: str | None = None) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axis = plt.subplots(figsize=(6, 4), constrained_layout=True)
    for name, points in curves.items():
        timed = [p for p in points if p.get("minutes") is not None]
        axis.plot([p["minutes"] for p in timed], [p["fid"] for p in timed], marker="o", label=name)
    axis.axhline(reference_fid, color="grey", linestyle="--", label="teacher, 25 steps (reference)")
    axis.set(xlabel=xlabel or "training wall minutes (one CPU thread)", ylabel="digits-FID (log scale)", yscale="log",
             title="digits-FID against training time")  # fmt: skip
    axis.legend()
    figure.savefig(path, dpi=120)
    return path


def student_pipeline(teacher_dir: str, teacher, student_dir: str, t_init: int):
    r"""The backbone's one-step pipeline on a copy of the teacher network, with the student's scheduler config."""
    backbone = training_backbone(teacher.unet if getattr(teacher, "unet", None) is not None else teacher.transformer)
    network = backbone.network_attribute
    saved = os.path.join(student_dir, "scheduler")
    config = ConsistencyStudentScheduler.load_config(saved) if os.path.isdir(saved) else {"t_init": t_init}
    pipe = backbone.student_pipeline.from_teacher(
        teacher_dir, **{network: os.path.join(teacher_dir, network)}, t_init=config["t_init"],
        input_type=config.get("input_type", "noise"),
    )  # fmt: skip
    if os.path.isdir(saved):  # the whole saved config (a consistency student's mid_timestep included)
        pipe.scheduler = ConsistencyStudentScheduler.from_pretrained(saved)
    pipe.set_progress_bar_config(disable=True)
    return pipe, getattr(pipe, network), backbone.call_kwargs


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher_dir", required=True)
    parser.add_argument("--judge_dir", required=True)
    parser.add_argument("--students", nargs="+", required=True, help="name=dir pairs (dirs holding checkpoint-N/)")
    parser.add_argument("--logs", nargs="*", default=[], help="name=training log pairs (for the minutes axis)")
    parser.add_argument("--cpu_seconds_per_iteration", nargs="*", default=[],
                        help="name=seconds pairs, measured alone: the minutes axis becomes iterations x seconds")
    parser.add_argument("--from_json", default=None, help="re-plot a previous curves.json (no evaluation)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--n_per_prompt", type=int, default=50)
    parser.add_argument("--t_init", type=int, default=800, help="for students without a saved scheduler/")
    parser.add_argument("--teacher_guidance_scale", type=float, default=1.25)
    parser.add_argument("--batch_size", type=int, default=100)
    parser.add_argument("--num_inference_steps", type=int, default=1, help="student steps of every point")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    students = dict(pair.split("=", 1) for pair in args.students)
    logs = {name: elapsed_minutes(path) for name, path in (pair.split("=", 1) for pair in args.logs)}
    per_iteration = {name: float(v) for name, v in (pair.split("=", 1) for pair in args.cpu_seconds_per_iteration)}
    os.makedirs(args.output_dir, exist_ok=True)
    if args.from_json:
        with open(args.from_json) as file:
            results = json.load(file)
        return _plots(results, args, per_iteration)

    judge = load_judge(args.judge_dir)
    prompts = digit_prompts()
    teacher = DiffusionPipeline.from_pretrained(args.teacher_dir, use_safetensors=True)
    teacher.set_progress_bar_config(disable=True)
    sample, teacher_nfe = teacher_sampler(teacher, "dpm++:25", args.teacher_guidance_scale)
    reference = evaluate_pipeline(sample, prompts, args.n_per_prompt, judge=judge, batch_size=args.batch_size,
                                  seed=args.seed)  # fmt: skip
    results = {"teacher": {**reference, "nfe": teacher_nfe}, "curves": {}}
    print(f"teacher_25step_cfg{args.teacher_guidance_scale}_fid: {reference['fid']:.4f}", flush=True)

    for name, path in students.items():
        pipe, network, call_kwargs = student_pipeline(args.teacher_dir, teacher, path, args.t_init)

        def student(prompts_batch, generator, pipe=pipe, call_kwargs=call_kwargs):
            return pipe(prompts_batch, generator=generator, output_type="pt",
                        num_inference_steps=args.num_inference_steps, **call_kwargs).images  # fmt: skip

        points = []
        for checkpoint in [None, *list_checkpoints(path)]:
            kind = "init" if checkpoint is None else load_checkpoint_weights(network, checkpoint)
            metrics = evaluate_pipeline(student, prompts, args.n_per_prompt, judge=judge, batch_size=args.batch_size,
                                        seed=args.seed)  # fmt: skip
            iteration = 0 if checkpoint is None else int(os.path.basename(checkpoint).split("-")[1])
            minutes = 0.0 if iteration == 0 and name in logs else logs.get(name, {}).get(iteration)
            points.append({"iteration": iteration, "weights": kind, "minutes": minutes, **metrics})
            print(f"{name}_iteration_{iteration}_fid: {metrics['fid']:.4f} (accuracy {metrics['accuracy']:.3f}, "
                  f"{kind} weights" + (f", {minutes:.1f} min" if minutes is not None else "") + ")", flush=True)
        results["curves"][name] = points
        best = min(points[1:] or points, key=lambda p: p["fid"])
        print(f"{name}_best_fid: {best['fid']:.4f} (iteration {best['iteration']})")

    with open(os.path.join(args.output_dir, "curves.json"), "w") as file:
        json.dump({"args": vars(args), **results}, file, indent=2, default=float)
    return _plots(results, args, per_iteration)


def _plots(results: dict, args, per_iteration: dict) -> dict:
    reference = results["teacher"]["fid"]
    plot = plot_distillation_curves(results["curves"], os.path.join(args.output_dir, "curves.png"), reference_fid=reference)
    for name, seconds in per_iteration.items():  # CPU minutes from the per-iteration cost measured alone
        for point in results["curves"].get(name, []):
            point["minutes"] = point["iteration"] * seconds / 60
    if any(p.get("minutes") is not None for points in results["curves"].values() for p in points):
        label = "CPU minutes (iterations x seconds per iteration, measured alone)" if per_iteration else None
        plot_minutes(results["curves"], os.path.join(args.output_dir, "curves_minutes.png"), reference, label)
    print(f"plot: {plot}")
    return results


if __name__ == "__main__":
    with torch.no_grad():
        main()
