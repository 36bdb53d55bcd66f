"""The README's main job: one-step digits from a distilled student, NASA negatives, adaptive collaboration.

    bash scripts/demo.sh                    # = python examples/digits/demo.py (after the set-up)
    python examples/digits/demo.py --n_per_prompt 100 --output_dir outputs/digits-demo

Everything is offline and real: the checkpoints in `examples/digits/checkpoints/` were trained on scikit-learn's
digits by the commands in `examples/digits/README.md` (teacher: a Stable-Diffusion-format pipeline; student:
`accelerate launch training/train_pg_swiftbrush.py`; judge and oracle: two small classifiers on the train split).
The demo

1. generates every digit in one step with the PG-SB student and in 25 DPM-Solver++ steps with the teacher, and
   scores both with the judge (digits-FID against real train images, prompt accuracy, precision / recall, speed);
2. asks for "a handwritten digit" with each digit in turn as the negative prompt, without and with NASA, and
   reports how often the negated digit is removed;
3. runs the adaptive pipeline: the student drafts, the oracle (not the judge) scores, the teacher refines the
   rejected half;
4. prints the metrics table and saves one picture of all three.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from digits_data import DIGIT_WORDS, digit_prompts  # noqa: E402
from evaluate import judge_features_and_logits, load_judge, save_image_grid, score_images  # noqa: E402
from oracle import DigitsOracle, load_or_train_oracle  # noqa: E402

from diffusers_onestep import AdaptiveCollabPipeline, OneStepPipeline  # noqa: E402
from diffusers_onestep.evaluation import removal_rate  # noqa: E402


CHECKPOINTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints")
GENERIC_PROMPT = "a handwritten digit"


def _load(checkpoints: str):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    missing = [
        name for name in ("teacher", "pgsb", "judge", "oracle") if not os.path.isdir(os.path.join(checkpoints, name))
    ]
    if missing:
        raise FileNotFoundError(
            f"`--checkpoints` {checkpoints} lacks {missing}; examples/digits/README.md gives the commands that make them."
        )
    # the UNets are stored in float16 to keep the repository small; they run in float32
    teacher = StableDiffusionPipeline.from_pretrained(
        os.path.join(checkpoints, "teacher"), use_safetensors=True, dtype=torch.float32
    )
    teacher.scheduler = DPMSolverMultistepScheduler.from_config(teacher.scheduler.config)
    student = OneStepPipeline.from_pretrained(os.path.join(checkpoints, "pgsb"), dtype=torch.float32)
    for pipe in (teacher, student):
        pipe.set_progress_bar_config(disable=True)
    judge = load_judge(os.path.join(checkpoints, "judge"))
    oracle = DigitsOracle(load_or_train_oracle(os.path.join(checkpoints, "oracle")))
    return teacher, student, judge, oracle


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", default=CHECKPOINTS)
    parser.add_argument("--output_dir", default="outputs/digits-demo")
    parser.add_argument("--n_per_prompt", type=int, default=50, help="images per digit for the metrics")
    parser.add_argument("--nasa_scale", type=float, default=None, help="defaults to the student's config")
    parser.add_argument("--teacher_steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    os.makedirs(args.output_dir, exist_ok=True)

    teacher, student, judge, oracle = _load(args.checkpoints)
    prompts = [p for p in digit_prompts() for _ in range(args.n_per_prompt)]
    labels = torch.arange(10).repeat_interleave(args.n_per_prompt)

    # 1. One step vs 25 teacher steps
    student_images, student_seconds = _timed(
        lambda: student(prompts, generator=torch.Generator().manual_seed(args.seed), output_type="pt").images
    )
    teacher_images, teacher_seconds = _timed(
        lambda: teacher(prompts, num_inference_steps=args.teacher_steps, guidance_scale=1.0,
                        generator=torch.Generator().manual_seed(args.seed), output_type="pt").images
    )  # fmt: skip
    rows = {
        "PG-SB student, 1 step": {**score_images(student_images, labels), "nfe": 1, "seconds": student_seconds},
        f"teacher, {args.teacher_steps} steps": {
            **score_images(teacher_images, labels), "nfe": args.teacher_steps, "seconds": teacher_seconds,
        },
    }  # fmt: skip

    # 2. NASA: "a handwritten digit" minus each digit in turn
    n_neg = args.n_per_prompt
    negated = torch.arange(10).repeat_interleave(n_neg)
    negatives = [DIGIT_WORDS[int(d)] for d in negated]
    generic = [GENERIC_PROMPT] * len(negatives)
    nasa_scale = student.config.nasa_scale if args.nasa_scale is None else args.nasa_scale
    nasa = {}
    for name, scale in (("without NASA", 0.0), (f"NASA alpha={nasa_scale:g}", nasa_scale)):
        images = student(generic, negative_prompt=negatives, nasa_scale=scale, output_type="pt",
                         generator=torch.Generator().manual_seed(args.seed)).images  # fmt: skip
        _, logits = judge_features_and_logits(images, judge)
        nasa[name] = {"removal_rate": removal_rate(logits, negated), "images": images}

    # 3. Adaptive collaboration: the student drafts, the oracle judges, the teacher refines the rejected half
    adaptive = AdaptiveCollabPipeline.from_pipelines(student, teacher, oracle=oracle)
    adaptive.set_progress_bar_config(disable=True)
    adaptive.calibrate(digit_prompts() * 5, batch_size=50, generator=torch.Generator().manual_seed(args.seed + 1))
    out, adaptive_seconds = _timed(
        lambda: adaptive(prompts, percentile=50, strategy="refine", refine_strength=0.5, teacher_steps=4,
                         teacher_guidance_scale=1.0, output_type="pt",
                         generator=torch.Generator().manual_seed(args.seed))
    )  # fmt: skip
    rows["adaptive (k=50, refine)"] = {
        **score_images(out.images, labels), "nfe": out.average_nfe, "seconds": adaptive_seconds,
    }  # fmt: skip

    # 4. The table and the picture
    print(f"\n{'model':28s} {'NFE':>5s} {'FID':>7s} {'acc':>6s} {'prec':>6s} {'recall':>6s} {'img/s':>8s}")
    for name, row in rows.items():
        print(f"{name:28s} {row['nfe']:5.2f} {row['fid']:7.2f} {row['accuracy']:6.3f} {row['precision']:6.3f} "
              f"{row['recall']:6.3f} {row['n'] / row['seconds']:8.1f}")  # fmt: skip
    print(f"\nNASA, '{GENERIC_PROMPT}' minus each digit ({len(negated)} images):")
    for name, row in nasa.items():
        print(f"  {name:20s} removal rate {row['removal_rate']:.3f}")

    picture = torch.cat(
        [
            student_images.unflatten(0, (10, args.n_per_prompt))[:, 0],  # student: one per digit
            teacher_images.unflatten(0, (10, args.n_per_prompt))[:, 0],  # teacher
            out.images.unflatten(0, (10, args.n_per_prompt))[:, 0],  # adaptive
            nasa["without NASA"]["images"].unflatten(0, (10, n_neg))[:, 0],  # generic, negative ignored
            list(nasa.values())[1]["images"].unflatten(0, (10, n_neg))[:, 0],  # generic minus digit d (column d)
        ]
    )
    path = os.path.join(args.output_dir, "digits_demo.png")
    save_image_grid(picture, path, nrow=10, scale=6)
    print(f"\npicture: {path} (rows: student 1 step, teacher, adaptive, generic prompt, generic minus column's digit)")
    results = {name: dict(row) for name, row in rows.items()}
    results.update({f"nasa {name}": {"removal_rate": row["removal_rate"]} for name, row in nasa.items()})
    return results


if __name__ == "__main__":
    main()
