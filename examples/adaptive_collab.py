"""Adaptive teacher-student collaboration: the student drafts, an oracle judges, the teacher refines the rest.

    # a Stable Diffusion teacher, a distilled one-step student and a CLIP oracle (directories or Hub ids)
    python examples/adaptive_collab.py --teacher stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --student_unet your-name/sd15-pgsb-student --clip openai/clip-vit-large-patch14 \
        --calibration_prompts_file prompts.txt --prompts "a photo of a pet" "a red car" --output_dir adaptive-out

    # offline smoke run on tiny random components built in code (seconds on a CPU)
    python examples/adaptive_collab.py --tiny --output_dir /tmp/adaptive-tiny

Calibrates the oracle's threshold on the student's samples, prints the refined share and the average NFE for the
percentiles k in {0, 10, 30, 50, 70, 90, 100}, saves the images of k = 50, then saves the pipeline (`student/`,
`teacher/`, `calibration.json`) and reloads it with the oracle, which is never saved.
"""

from __future__ import annotations

import argparse
import logging
import os

import torch


# diffusers' pipeline modules import transformers' `CLIPImageProcessor` (and SigLIP's), which without torchvision falls
# back to the PIL processor (the behaviour before transformers 5) and logs so on every run. Set before diffusers loads.
logging.getLogger("transformers.utils.import_utils").addFilter(
    lambda record: "requires torchvision (not installed)" not in record.getMessage()
)

from diffusers import StableDiffusionPipeline  # noqa: E402

import diffusers_onestep  # noqa: F401, E402  (registers the library's classes for diffusers)
from diffusers_onestep.pipelines.loading import load_pipeline  # noqa: E402
from diffusers_onestep.pipelines.oracles import CLIPScoreOracle  # noqa: E402
from diffusers_onestep.pipelines.pipeline_adaptive_collab import AdaptiveCollabPipeline  # noqa: E402
from diffusers_onestep.pipelines.pipeline_onestep import OneStepPipeline  # noqa: E402


__all__ = ["build_pipeline", "build_tiny_pipeline", "main"]

PERCENTILES = (0, 10, 30, 50, 70, 90, 100)
TINY_PROMPTS = ["a photo of a cat", "a photo of a dog", "the digit seven", "a pet", "the number one", "a cat"]


def build_tiny_pipeline() -> AdaptiveCollabPipeline:
    r"""Tiny random teacher, student and CLIP oracle built in code: the code path of a real run, offline."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from diffusers_onestep.testing_utils import (
        build_clip_tokenizer,
        get_dummy_components,
        get_dummy_teacher_components,
    )

    teacher = StableDiffusionPipeline(**get_dummy_teacher_components(seed=0))
    student = OneStepPipeline.from_teacher(teacher, unet=get_dummy_components(seed=1)["unet"])
    sizes = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2}
    text = {**sizes, "vocab_size": 1100, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1}
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config={**sizes, "image_size": 16, "patch_size": 4}))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size=16)
    oracle = CLIPScoreOracle(clip, CLIPProcessor(image_processor=image_processor, tokenizer=build_clip_tokenizer()))
    return AdaptiveCollabPipeline.from_pipelines(student, teacher, oracle=oracle)


def build_pipeline(
    teacher: str, student_unet: str | None, student_lora: str | None, clip: str, torch_dtype: torch.dtype
) -> AdaptiveCollabPipeline:
    r"""A teacher checkpoint, a one-step student sharing its VAE / text encoder / tokenizer, and a CLIP oracle."""
    teacher_pipe = load_pipeline(teacher, "--teacher", dtype=torch_dtype)
    student = OneStepPipeline.from_teacher(teacher_pipe, unet=student_unet, lora=student_lora, dtype=torch_dtype)
    oracle = CLIPScoreOracle.from_pretrained(clip, torch_dtype=torch_dtype)
    return AdaptiveCollabPipeline.from_pipelines(student, teacher_pipe, oracle=oracle)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random components built in code (offline)")
    parser.add_argument("--teacher", help="Stable Diffusion checkpoint directory or Hub id")
    parser.add_argument("--student_unet", help="the distilled student UNet (directory or Hub id)")
    parser.add_argument("--student_lora", help="or the student as LoRA weights on the teacher")
    parser.add_argument("--clip", default="openai/clip-vit-large-patch14", help="CLIP model for the oracle")
    parser.add_argument("--calibration_prompts_file", help="one prompt per line (defaults to --prompts)")
    parser.add_argument("--prompts", nargs="+", default=None)
    parser.add_argument("--strategy", default="refine", choices=["refine", "regenerate"])
    parser.add_argument("--refine_strength", type=float, default=0.7)
    parser.add_argument("--teacher_steps", type=int, default=12)
    parser.add_argument("--teacher_guidance_scale", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    if not args.tiny and (args.teacher is None or (args.student_unet is None and args.student_lora is None)):
        parser.error("pass --teacher and --student_unet (or --student_lora), or --tiny")
    if args.tiny:
        args.teacher_steps, args.prompts = min(args.teacher_steps, 2), args.prompts or TINY_PROMPTS[:4]
    if not args.prompts:
        parser.error("pass --prompts")

    # 1. The pipeline: student + teacher (modules shared, not copied) + oracle
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    pipe = build_tiny_pipeline() if args.tiny else build_pipeline(
        args.teacher, args.student_unet, args.student_lora, args.clip, dtype
    )  # fmt: skip
    pipe = pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)

    # 2. Calibrate: percentiles of the oracle's scores on the student's own samples
    calibration_prompts = TINY_PROMPTS if args.tiny else args.prompts
    if args.calibration_prompts_file:
        with open(args.calibration_prompts_file, encoding="utf-8") as file:
            calibration_prompts = [line.strip() for line in file if line.strip()]
    generator = torch.Generator(args.device).manual_seed(args.seed)
    pipe.calibrate(calibration_prompts, batch_size=8, generator=generator)

    # 3. Quality for its price: the share the teacher refines and the average NFE per percentile
    results = {}
    call = {"strategy": args.strategy, "refine_strength": args.refine_strength, "teacher_steps": args.teacher_steps,
            "teacher_guidance_scale": args.teacher_guidance_scale}  # fmt: skip
    for k in PERCENTILES:
        out = pipe(args.prompts, percentile=k, generator=torch.Generator(args.device).manual_seed(args.seed), **call)
        results[k] = {"refined": out.refined.tolist(), "average_nfe": out.average_nfe, "threshold": out.threshold}
        print(f"k={k:3d}: tau={out.threshold:9.4f}  refined {int(out.refined.sum())}/{len(out.refined)}  "
              f"average NFE {out.average_nfe:.2f}")  # fmt: skip
        if k == 50:
            os.makedirs(args.output_dir, exist_ok=True)
            for i, (image, refined) in enumerate(zip(out.images, out.refined.tolist())):
                image.save(os.path.join(args.output_dir, f"{i:03d}_{'refined' if refined else 'kept'}.png"))

    # 4. Save (student/, teacher/ without the modules it shares with the student, calibration.json) and reload
    pipeline_dir = os.path.join(args.output_dir, "pipeline")
    pipe.save_pretrained(pipeline_dir)
    reloaded = AdaptiveCollabPipeline.from_pretrained(pipeline_dir, oracle=pipe.oracle, dtype=dtype)
    assert reloaded.calibration == pipe.calibration
    print(f"saved and reloaded: {pipeline_dir}")
    return results


if __name__ == "__main__":
    main()
