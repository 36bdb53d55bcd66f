"""The README's main job: one-step digits from a distilled student, NASA negatives, adaptive collaboration.

    bash scripts/demo.sh                    # = python examples/digits/demo.py (after the set-up)
    python examples/digits/demo.py --n_per_prompt 100 --output_dir outputs/digits-demo

Everything is offline and real: the checkpoints in `examples/digits/checkpoints/` were trained on scikit-learn's
digits by the commands in `examples/digits/README.md` (teacher: a Stable-Diffusion-format pipeline; student: the
best one-step student of the leaderboard, `leaderboard.py`, named in `checkpoints/student/provenance.json`; judge
and oracle: two small classifiers on the train split). The demo

1. generates every digit in one step with the student and in 25 DPM-Solver++ steps with the teacher at CFG 1.25
   (the benchmark's best teacher, the README's table), and scores both with the judge (digits-FID against real train images, prompt accuracy, precision / recall, speed);
2. asks for "a handwritten digit" with each digit in turn as the negative prompt, without and with NASA, and
   reports how often the negated digit is removed;
3. runs the adaptive pipeline: the student drafts, the oracle (not the judge) scores, the teacher refines the
   rejected half (4 steps at the same CFG);
4. prints the metrics table and saves one picture of all three, each row labelled.

Each phase prints a line when it starts and its time when it ends (the teacher's steps show a progress bar).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from contextlib import contextmanager

import torch


# diffusers' pipeline modules import transformers' `CLIPImageProcessor` (and SigLIP's), which without torchvision falls
# back to the PIL processor (the behaviour before transformers 5) and logs so on every run; the demo uses no image
# processor. Set before anything imports diffusers.
logging.getLogger("transformers.utils.import_utils").addFilter(
    lambda record: "requires torchvision (not installed)" not in record.getMessage()
)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from digits_data import DIGIT_WORDS, digit_prompts  # noqa: E402
from evaluate import judge_features_and_logits, load_judge, save_image_grid, score_images  # noqa: E402
from export_checkpoints import student_label  # noqa: E402
from oracle import DigitsOracle, load_or_train_oracle  # noqa: E402

from diffusers_onestep import AdaptiveCollabPipeline, OneStepPipeline  # noqa: E402
from diffusers_onestep.evaluation import removal_rate  # noqa: E402


CHECKPOINTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints")
GENERIC_PROMPT = "a handwritten digit"


def _load(checkpoints: str):
    import diffusers
    import transformers
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    # the demo reports its own progress; the loaders' per-component bars would only add lines
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()

    missing = [
        name for name in ("teacher", "student", "judge", "oracle") if not os.path.isdir(os.path.join(checkpoints, name))
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
    student = OneStepPipeline.from_pretrained(os.path.join(checkpoints, "student"), dtype=torch.float32)
    for pipe in (teacher, student):
        pipe.set_progress_bar_config(disable=True)
    judge = load_judge(os.path.join(checkpoints, "judge"))
    oracle = DigitsOracle(load_or_train_oracle(os.path.join(checkpoints, "oracle")))
    return teacher, student, judge, oracle, student_label(os.path.join(checkpoints, "student"))


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


@contextmanager
def _phase(text: str):
    """Prints `text` when a phase starts and its wall-clock time when it ends, so no phase runs silently."""
    print(f"{text} ...", flush=True)
    start = time.perf_counter()
    yield
    print(f"    done in {time.perf_counter() - start:.1f} s", flush=True)


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", default=CHECKPOINTS)
    parser.add_argument("--output_dir", default="outputs/digits-demo")
    parser.add_argument("--n_per_prompt", type=int, default=50, help="images per digit for the metrics")
    parser.add_argument("--nasa_scale", type=float, default=None, help="defaults to the student's config")
    parser.add_argument("--teacher_steps", type=int, default=25)
    parser.add_argument("--teacher_guidance_scale", type=float, default=1.25,
                        help="the teacher's CFG (1.25: the best by FID in the benchmark, the README's table)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    os.makedirs(args.output_dir, exist_ok=True)
    demo_start = time.perf_counter()

    with _phase(f"Loading the checkpoints from {args.checkpoints}"):
        teacher, student, judge, oracle, label = _load(args.checkpoints)
    prompts = [p for p in digit_prompts() for _ in range(args.n_per_prompt)]
    labels = torch.arange(10).repeat_interleave(args.n_per_prompt)
    cfg = args.teacher_guidance_scale
    teacher_nfe = args.teacher_steps * (2 if cfg > 1 else 1)  # CFG runs the UNet on two branches

    # 1. One step vs 25 teacher steps
    with _phase(f"[1/4] {label}: {len(prompts)} images (10 digits), one step each"):
        student_images, student_seconds = _timed(
            lambda: student(prompts, generator=torch.Generator().manual_seed(args.seed), output_type="pt").images
        )
    teacher_phase = f"{args.teacher_steps} DPM-Solver++ steps at CFG {cfg:g}"
    with _phase(f"[2/4] teacher: the same {len(prompts)} images, {teacher_phase}"):
        teacher.set_progress_bar_config(desc="    teacher steps", leave=False)
        teacher_images, teacher_seconds = _timed(
            lambda: teacher(prompts, num_inference_steps=args.teacher_steps, guidance_scale=cfg,
                            generator=torch.Generator().manual_seed(args.seed), output_type="pt").images
        )  # fmt: skip
        teacher.set_progress_bar_config(disable=True)
    teacher_name = f"teacher, {args.teacher_steps} steps, CFG {cfg:g}"
    rows = {
        f"{label}, 1 step": {**score_images(student_images, labels), "nfe": 1, "seconds": student_seconds},
        teacher_name: {**score_images(teacher_images, labels), "nfe": teacher_nfe, "seconds": teacher_seconds},
    }

    # 2. NASA: "a handwritten digit" minus each digit in turn
    n_neg = args.n_per_prompt
    negated = torch.arange(10).repeat_interleave(n_neg)
    negatives = [DIGIT_WORDS[int(d)] for d in negated]
    generic = [GENERIC_PROMPT] * len(negatives)
    nasa_scale = student.config.nasa_scale if args.nasa_scale is None else args.nasa_scale
    nasa = {}
    with _phase(f"[3/4] NASA: '{GENERIC_PROMPT}' minus each digit, {len(generic)} images without and with NASA"):
        for name, scale in (("without NASA", 0.0), (f"NASA alpha={nasa_scale:g}", nasa_scale)):
            images = student(generic, negative_prompt=negatives, nasa_scale=scale, output_type="pt",
                             generator=torch.Generator().manual_seed(args.seed)).images  # fmt: skip
            _, logits = judge_features_and_logits(images, judge)
            nasa[name] = {"removal_rate": removal_rate(logits, negated), "images": images}

    # 3. Adaptive collaboration: the student drafts, the oracle judges, the teacher refines the rejected half
    adaptive = AdaptiveCollabPipeline.from_pipelines(student, teacher, oracle=oracle)
    adaptive.set_progress_bar_config(disable=True)
    calibration = digit_prompts() * 5
    with _phase(f"[4/4] adaptive: calibrating the oracle on {len(calibration)} student drafts, then {len(prompts)} "
                f"images with the teacher refining the lower half (4 steps, CFG {cfg:g})"):  # fmt: skip
        adaptive.calibrate(calibration, batch_size=50, generator=torch.Generator().manual_seed(args.seed + 1))
        out, adaptive_seconds = _timed(
            lambda: adaptive(prompts, percentile=50, strategy="refine", refine_strength=0.5, teacher_steps=4,
                             teacher_guidance_scale=cfg, output_type="pt",
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

    def first_per_digit(images: torch.Tensor) -> torch.Tensor:
        return images.unflatten(0, (10, -1))[:, 0]

    picture_rows = {  # one image per digit (column d: digit d; in the last row, the generic prompt minus digit d)
        f"{label}, 1 step": first_per_digit(student_images),
        f"teacher, {args.teacher_steps} steps, CFG {cfg:g}": first_per_digit(teacher_images),
        f"adaptive, {out.average_nfe:.1f} NFE": first_per_digit(out.images),
        f"'{GENERIC_PROMPT}', no NASA": first_per_digit(nasa["without NASA"]["images"]),
        f"minus the column's digit, NASA {nasa_scale:g}": first_per_digit(list(nasa.values())[1]["images"]),
    }
    path = os.path.join(args.output_dir, "digits_demo.png")
    save_image_grid(torch.cat(list(picture_rows.values())), path, nrow=10, scale=6, row_labels=list(picture_rows),
                    column_labels=[str(d) for d in range(10)])  # fmt: skip
    print(f"\npicture: {path} (rows: {'; '.join(picture_rows)}; columns: digits 0-9)")
    print(f"total: {time.perf_counter() - demo_start:.0f} s")
    results = {name: dict(row) for name, row in rows.items()}
    results.update({f"nasa {name}": {"removal_rate": row["removal_rate"]} for name, row in nasa.items()})
    return results


if __name__ == "__main__":
    main()
