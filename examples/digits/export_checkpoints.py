"""Packs the trained digits artifacts into `examples/digits/checkpoints/` for the README demo (<= 25 MB in all).

    python examples/digits/export_checkpoints.py --teacher_dir examples/digits/checkpoints/teacher \
        --student_dir /work/digits_artifacts/leaderboard/runs/sid/lr2x \
        --student_checkpoint /work/digits_artifacts/leaderboard/runs/sid/lr2x/checkpoint-226 --student_weights ema \
        --student_label "SiD student" --judge_dir examples/digits/checkpoints/judge \
        --oracle_dir examples/digits/checkpoints/oracle --nasa_scale 0.5

`--student_checkpoint DIR/checkpoint-N --student_weights ema|raw` exports the weights of one training checkpoint of
the run in `--student_dir` instead of its final save (the leaderboard's best checkpoint, `leaderboard.py`).

The student goes to `student/`, with the training run's model card (`README.md`) and `provenance.json` (its
`--student_label`, the run, the checkpoint and weights it was packed from), which the demo and the app read.

The two UNets (teacher and student, 3.2M parameters each) are stored in float16 (12.6 MB -> 6.3 MB each); everything
else stays float32. The demo loads them with `dtype=torch.float32`. Every file is safetensors or JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import torch
from diffusers import StableDiffusionPipeline

from diffusers_onestep import OneStepPipeline


__all__ = ["PROVENANCE", "main", "student_label"]

CHECKPOINTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints")
MAX_BYTES = 25 * 1024 * 1024
PROVENANCE = "provenance.json"  # in checkpoints/student/: its label, the run and the checkpoint it was packed from


def student_label(student_dir: str, default: str = "student") -> str:
    r"""The exported student's label ("SCT student", ...), from its `provenance.json`."""
    path = os.path.join(student_dir, PROVENANCE)
    if not os.path.isfile(path):
        return default
    with open(path) as file:
        return json.load(file).get("label", default)


def _folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher_dir", required=True)
    parser.add_argument("--student_dir", required=True, help="a OneStepPipeline directory (any training script's)")
    parser.add_argument("--student_checkpoint", default=None, help="a checkpoint-N of that run: export its weights")
    parser.add_argument("--student_weights", choices=["ema", "raw"], default="ema", help="of --student_checkpoint")
    parser.add_argument("--student_label", default="PG-SB student", help="its name in the demo's table and picture")
    parser.add_argument("--judge_dir", required=True)
    parser.add_argument("--oracle_dir", required=True)
    parser.add_argument("--output_dir", default=CHECKPOINTS)
    parser.add_argument(
        "--nasa_scale", type=float, default=0.25,
        help="the student's default NASA scale (benchmark table 2: the smallest scale removing >= 95%% of negated digits)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.student_checkpoint and not os.path.isfile(os.path.join(args.student_checkpoint, "trainable_0.safetensors")):
        parser.error(f"--student_checkpoint {args.student_checkpoint} is not a training checkpoint (no trainable_0)")

    # everything is loaded before the old export is removed: a failure leaves it as it was
    teacher = StableDiffusionPipeline.from_pretrained(args.teacher_dir, use_safetensors=True)
    student = OneStepPipeline.from_pretrained(args.student_dir)
    if args.student_checkpoint:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from benchmark import load_checkpoint_weights

        loaded = load_checkpoint_weights(student.unet, args.student_checkpoint, args.student_weights == "ema")
        if loaded != args.student_weights:
            raise SystemExit(f"{args.student_checkpoint} holds no EMA weights: pass --student_weights raw")
    # the judge and the oracle may live in the output directory itself (re-exporting from checkpoints/): stage them
    staging = tempfile.mkdtemp()
    for name, source in (("judge", args.judge_dir), ("oracle", args.oracle_dir)):
        shutil.copytree(source, os.path.join(staging, name))
    if os.path.isdir(args.output_dir):
        shutil.rmtree(args.output_dir)
    os.makedirs(args.output_dir)
    teacher.unet.to(torch.float16)
    teacher.save_pretrained(os.path.join(args.output_dir, "teacher"), safe_serialization=True)
    student.unet.to(torch.float16)
    student.register_to_config(nasa_scale=args.nasa_scale)
    student_out = os.path.join(args.output_dir, "student")
    student.save_pretrained(student_out, safe_serialization=True)
    card = os.path.join(args.student_dir, "README.md")  # the training run's model card: method, command, metrics
    if os.path.isfile(card):
        shutil.copyfile(card, os.path.join(student_out, "README.md"))
    with open(os.path.join(student_out, PROVENANCE), "w") as file:
        json.dump({"label": args.student_label, "student_dir": args.student_dir, "checkpoint": args.student_checkpoint,
                   "weights": args.student_weights if args.student_checkpoint else "final save",
                   "nasa_scale": args.nasa_scale}, file, indent=1)  # fmt: skip
    for name in ("judge", "oracle"):
        shutil.move(os.path.join(staging, name), os.path.join(args.output_dir, name))
    shutil.rmtree(staging)

    sizes = {name: _folder_bytes(os.path.join(args.output_dir, name)) for name in sorted(os.listdir(args.output_dir))}
    total = sum(sizes.values())
    for name, size in sizes.items():
        print(f"{name}: {size / 2**20:.2f} MiB")
    print(f"total: {total / 2**20:.2f} MiB")
    if total > MAX_BYTES:
        raise SystemExit(f"the checkpoints take {total / 2**20:.1f} MiB, more than the 25 MiB budget")
    return sizes


if __name__ == "__main__":
    main()
