"""Digits: negative prompts through NASA, NAG and CFG, on the one-step student and on the teacher as a few-step model.

    OMP_NUM_THREADS=1 python examples/digits/negative_guidance.py \
        --teacher_dir examples/digits/checkpoints/teacher --judge_dir examples/digits/checkpoints/judge \
        --students pgsb=examples/digits/checkpoints/pgsb --output_dir /work/digits_artifacts/negative_guidance \
        --n_per_prompt 50

BENCHMARKS.md table 2's protocol (`benchmark.py`): the generic prompt "a handwritten digit" with each digit in turn as
the negative prompt; removal rate (share of images the judge does not classify as the negated digit) and digits-FID
against the real train images of the nine other digits. Every method goes through the library's entry point,
`diffusers_onestep.nasa(pipe, negative_prompt=..., scale=..., method=...)`, on the student (`OneStepPipeline`) and on
the teacher (diffusers' own `StableDiffusionPipeline`, DPM-Solver++, no CFG) alike; CFG is each pipeline's own
(`negative_prompt=`, `guidance_scale > 1`). At equal NFE: the student's NASA / NAG at 2 steps against its CFG at 1
step (2 NFE each; NASA / NAG at 1 step too), the teacher's NASA / NAG at 4 steps against its CFG at 2 steps (4 NFE
each). Each method sweeps its scale (NASA `alpha`, NAG `phi`, CFG
`guidance_scale`; NAG's `tau` / `alpha` are the paper's for the pipeline family: SD1.5 2.5 / 0.375, SDXL 2.5 /
0.5). Writes `results.json`, one grid per row and `removal_vs_fid.png` (removal against FID over each
sweep, one line per model and method).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from benchmark import (
    NEGATIVE_WORDINGS,
    BenchmarkContext,
    _evaluate,
    _nasa_floor,
    _nasa_scores,
    _negative,
    format_table,
)
from digits_data import GENERIC_CAPTION
from evaluate import load_judge

import diffusers_onestep


def _callable(pipe, steps: int, method: str, scale: float, extra: dict):
    """`evaluate_pipeline`'s callable: the generic prompt, the batch's negatives through `method` at `scale`."""

    def call(negatives: list[str], generator: torch.Generator) -> torch.Tensor:
        kwargs = dict(num_inference_steps=steps, generator=generator, output_type="pt", **extra)
        prompts = [GENERIC_CAPTION] * len(negatives)
        if method == "cfg":
            return pipe(prompts, negative_prompt=list(negatives), guidance_scale=scale, **kwargs).images
        with diffusers_onestep.nasa(pipe, negative_prompt=list(negatives), scale=scale, method=method):
            return pipe(prompts, guidance_scale=1.0, **kwargs).images

    return call


def sweep(ctx, model: str, pipe, wording: str, rows_spec: list[tuple[str, int, float]], extra: dict) -> list[dict]:
    negatives = [_negative(wording, d) for d in range(10)]
    rows = []
    for method, steps, scale in rows_spec:
        key = f"{model}_{method}{scale:g}_{steps}step"
        start = time.perf_counter()
        metrics, images = _evaluate(ctx, key, _callable(pipe, steps, method, scale, extra), None, prompts=negatives,
                                    labels=range(10), return_images=True)  # fmt: skip
        negated = torch.arange(10).repeat_interleave(len(images) // 10)
        metrics = {k: v for k, v in metrics.items() if k not in ("fid", "accuracy", "precision", "recall")}
        nfe = steps * (2 if method == "cfg" else 1)
        rows.append({"model": model, "method": method.upper(), "scale": scale, "steps": steps, "nfe": nfe,
                     **metrics, **_nasa_scores(ctx, images, negated), "seconds": time.perf_counter() - start})  # fmt: skip
        ctx.progress(f"{key}: removal {rows[-1]['removal_rate']:.3f}, FID other 9 {rows[-1]['fid_other9']:.2f}")
    return rows


def plot(rows: list[dict], path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axis = plt.subplots(figsize=(7, 5), constrained_layout=True)
    lines = {}
    for row in rows:
        lines.setdefault(f"{row['model']} {row['method']} ({row['steps']} step{'s' * (row['steps'] > 1)}, "
                         f"{row['nfe']} NFE)", []).append(row)  # fmt: skip
    for label, points in lines.items():
        points = sorted(points, key=lambda r: r["scale"])
        axis.plot([p["fid_other9"] for p in points], [p["removal_rate"] for p in points], marker="o", label=label)
        for p in points:
            axis.annotate(f"{p['scale']:g}", (p["fid_other9"], p["removal_rate"]), fontsize=7)
    axis.axhline(0.9, color="grey", linestyle=":", label="negative ignored (0.9)")
    axis.set(xlabel="digits-FID of the other nine digits (lower is better)", xscale="log",
             ylabel="removal rate (higher is better)", title="Negative prompts on digits: removal vs FID per scale")  # fmt: skip
    axis.legend(fontsize=7)
    figure.savefig(path, dpi=120)
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher_dir", required=True)
    parser.add_argument("--judge_dir", required=True)
    parser.add_argument("--students", nargs=1, required=True, help="name=path of the one-step student")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--n_per_prompt", type=int, default=50, help="images per negated digit")
    parser.add_argument("--wording", default=NEGATIVE_WORDINGS[0], choices=NEGATIVE_WORDINGS)
    parser.add_argument("--nasa_scales", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0, 1.5])
    parser.add_argument("--nag_scales", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    parser.add_argument("--cfg_scales", type=float, nargs="+", default=[1.5, 2.0, 3.0, 5.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--num_threads", type=int, default=1)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.num_threads)
    from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler

    # any supported teacher / student pair (SD, or the SDXL-shaped digits world): diffusers' loader picks the class
    teacher = DiffusionPipeline.from_pretrained(args.teacher_dir, use_safetensors=True)
    student_name, student_path = args.students[0].split("=", 1)
    student = DiffusionPipeline.from_pretrained(student_path, use_safetensors=True)
    for pipe in (teacher, student):
        pipe.set_progress_bar_config(disable=True)
    ctx = BenchmarkContext(args, load_judge(args.judge_dir), teacher, {student_name: student}, {student_name: student_path})
    ctx.results["config"] = {**vars(args), "teacher_class": type(teacher).__name__,
                             "student_class": type(student).__name__}  # fmt: skip

    teacher.scheduler = DPMSolverMultistepScheduler.from_config(teacher.scheduler.config)

    def spec(steps_attention, steps_cfg):
        rows = [("nasa", s, a) for s in steps_attention for a in args.nasa_scales]
        rows += [("nag", s, p) for s in steps_attention for p in args.nag_scales]
        return rows + [("cfg", steps_cfg, g) for g in args.cfg_scales]

    rows = sweep(ctx, student_name, student, args.wording, spec((1, 2), 1), {})
    rows += sweep(ctx, "teacher", teacher, args.wording, spec((4,), 2), {})
    floor, floor_n = _nasa_floor(ctx, args.n_per_prompt)
    text = format_table(
        f"Negative prompts (prompt {GENERIC_CAPTION!r}, negative {args.wording!r} for each digit in turn, "
        f"N = {10 * args.n_per_prompt} per row)",
        [("model", "model", "s"), ("method", "method", "s"), ("scale", "scale", "g"), ("steps", "steps", "d"),
         ("NFE", "nfe", "d"), ("removal", "removal_rate", ".3f"), ("FID other 9", "fid_other9", ".2f"),
         ("s", "seconds", ".0f")],
        rows,
        [f"real test images of the other nine digits: FID other 9 = {floor:.2f} ({floor_n} per digit)",
         "NASA scale = alpha; NAG scale = phi (tau, alpha: the NAG paper's values for the pipeline's family, SD1.5 "
         "2.5 / 0.375, SDXL 2.5 / 0.5); CFG scale = guidance_scale with the negative as unconditional branch; NASA "
         "scale 0 = no negative"],
    )  # fmt: skip
    print(text, flush=True)
    os.makedirs(args.output_dir, exist_ok=True)
    result = {"rows": rows, "fid_other9_floor": floor, "config": ctx.results["config"],
              "plot": plot(rows, os.path.join(args.output_dir, "removal_vs_fid.png"))}  # fmt: skip
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)
    return result


if __name__ == "__main__":
    main()
