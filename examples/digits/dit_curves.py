"""Distillation curves of students of the digits DiT teacher (SNOOPI's central claim on a DiT backbone).

    OMP_NUM_THREADS=1 python examples/digits/dit_curves.py --teacher_dir /work/digits_artifacts/dit_teacher \
        --judge_dir examples/digits/checkpoints/judge --output_dir OUT --n_per_prompt 50 \
        --students pgsb=/work/digits_artifacts/dit_students/pgsb swiftbrush=/work/digits_artifacts/dit_students/swiftbrush

For every `checkpoint-N/` of every student (iteration 0 is the teacher's own transformer), the 1-step digits-FID and
prompt accuracy of `OneStepPixArtPipeline` at the students' `t_init`, against the teacher at DPM-Solver++ 25 steps with
CFG at the same N. Prints `name: value` lines, writes `dit_curves.json` and `dit_curves.png` (the plot of
`benchmark.plot_distillation_curves`). Checkpoint weights are loaded with `benchmark.load_checkpoint_weights` (the EMA
weights when the checkpoint has them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from diffusers import PixArtAlphaPipeline


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchmark import load_checkpoint_weights, plot_distillation_curves  # noqa: E402
from digits_data import digit_prompts  # noqa: E402
from evaluate import evaluate_pipeline, load_judge, teacher_sampler  # noqa: E402

from diffusers_onestep import OneStepPixArtPipeline  # noqa: E402
from diffusers_onestep.training_utils import list_checkpoints  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher_dir", required=True)
    parser.add_argument("--judge_dir", required=True)
    parser.add_argument("--students", nargs="+", required=True, help="name=dir pairs (dirs holding checkpoint-N/)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--n_per_prompt", type=int, default=50)
    parser.add_argument("--t_init", type=int, default=800)
    parser.add_argument("--teacher_guidance_scale", type=float, default=1.25)
    parser.add_argument("--batch_size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    students = dict(pair.split("=", 1) for pair in args.students)
    os.makedirs(args.output_dir, exist_ok=True)

    judge = load_judge(args.judge_dir)
    prompts = digit_prompts()
    teacher = PixArtAlphaPipeline.from_pretrained(args.teacher_dir, use_safetensors=True)
    teacher.set_progress_bar_config(disable=True)
    sample, teacher_nfe = teacher_sampler(teacher, "dpm++:25", args.teacher_guidance_scale)
    reference = evaluate_pipeline(sample, prompts, args.n_per_prompt, judge=judge, batch_size=args.batch_size,
                                  seed=args.seed)  # fmt: skip
    results = {"teacher": {**reference, "nfe": teacher_nfe}, "curves": {}}
    print(f"teacher_25step_cfg{args.teacher_guidance_scale}_fid: {reference['fid']:.4f}", flush=True)

    for name, path in students.items():
        pipe = OneStepPixArtPipeline.from_teacher(args.teacher_dir, transformer=os.path.join(args.teacher_dir,
                                                  "transformer"), t_init=args.t_init)  # fmt: skip
        pipe.set_progress_bar_config(disable=True)

        def student(prompts_batch, generator, pipe=pipe):
            return pipe(prompts_batch, generator=generator, output_type="pt", use_resolution_binning=False).images

        points = []
        for checkpoint in [None, *list_checkpoints(path)]:
            kind = "init" if checkpoint is None else load_checkpoint_weights(pipe.transformer, checkpoint)
            metrics = evaluate_pipeline(student, prompts, args.n_per_prompt, judge=judge, batch_size=args.batch_size,
                                        seed=args.seed)  # fmt: skip
            iteration = 0 if checkpoint is None else int(os.path.basename(checkpoint).split("-")[1])
            points.append({"iteration": iteration, "weights": kind, **metrics})
            print(f"{name}_iteration_{iteration}_fid: {metrics['fid']:.4f} (accuracy {metrics['accuracy']:.3f}, "
                  f"{kind} weights)", flush=True)  # fmt: skip
        results["curves"][name] = points
        best = min(points[1:] or points, key=lambda p: p["fid"])
        print(f"{name}_best_fid: {best['fid']:.4f} (iteration {best['iteration']})")

    plot = plot_distillation_curves(results["curves"], os.path.join(args.output_dir, "dit_curves.png"),
                                    reference_fid=reference["fid"])  # fmt: skip
    with open(os.path.join(args.output_dir, "dit_curves.json"), "w") as file:
        json.dump({"args": vars(args), **results}, file, indent=2, default=float)
    print(f"plot: {plot}")
    return results


if __name__ == "__main__":
    with torch.no_grad():
        main()
