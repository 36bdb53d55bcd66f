"""Scores generated digits with the judge: digits-FID, prompt accuracy, precision / recall (and speed).

    python examples/digits/evaluate.py --teacher_dir /work/digits_artifacts/teacher \
        --judge_dir /work/digits_artifacts/judge --output_json /work/digits_artifacts/teacher_eval.json

The same functions score the teacher here and, later, the one-step students, NASA and the adaptive pipeline:

- `load_judge(path)` loads the judge (and makes it the default of the other functions);
- `judge_features_and_logits(images)` maps images `(N, C, H, W)` in `[0, 1]` (or `value_range=(-1, 1)`) to the
  judge's 128-d features and 10 logits;
- `score_images(images, labels)` -> metrics dict against the real train split;
- `evaluate_pipeline(pipe_callable, prompts, n_per_prompt, labels)` generates and scores, timing the generation.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from digits_data import NUM_TEST, digit_prompts, load_digits_split
from judge import DigitsJudge, load_judge_model

from diffusers_onestep.evaluation import fid_from_features, precision_recall, prompt_accuracy


__all__ = [
    "evaluate_pipeline",
    "judge_features_and_logits",
    "load_judge",
    "main",
    "real_features",
    "save_image_grid",
    "score_images",
    "subset_fid",
    "teacher_sampler",
    "to_judge_input",
]

_DEFAULT_JUDGE: DigitsJudge | None = None
_REAL_FEATURES: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}


def load_judge(path: str) -> DigitsJudge:
    r"""Loads the judge saved in `path` (by `judge.py`) and makes it the default judge of this module's functions."""
    global _DEFAULT_JUDGE
    _DEFAULT_JUDGE = load_judge_model(path)
    return _DEFAULT_JUDGE


def _resolve_judge(judge: DigitsJudge | None) -> DigitsJudge:
    if judge is not None:
        return judge
    if _DEFAULT_JUDGE is None:
        raise ValueError("no judge given: pass `judge=` or call `load_judge(path)` first.")
    return _DEFAULT_JUDGE


def to_judge_input(images: torch.Tensor, value_range: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    r"""
    Converts images to the judge's input: `(N, 1, 8, 8)` float32 in `[-1, 1]`.

    Args:
        images (`torch.Tensor` of shape `(N, C, H, W)`): `C` is 1 or 3 (channels are averaged); other sizes than 8x8
            are area-resized.
        value_range (`tuple[float, float]`, defaults to `(0, 1)`): the range of `images`: `(0, 1)` for diffusers'
            `output_type="pt"`, `(-1, 1)` for VAE outputs and `load_digits_split`. Values are clamped to it.
    """
    images = torch.as_tensor(images).detach().float().cpu()
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"`images` must have shape (N, 1 or 3, H, W), got {tuple(images.shape)}.")
    low, high = value_range
    images = (images.clamp(low, high) - low) / (high - low)
    images = images.mean(dim=1, keepdim=True)
    if images.shape[-2:] != (8, 8):
        images = F.adaptive_avg_pool2d(images, 8)
    return images * 2 - 1


@torch.no_grad()
def judge_features_and_logits(
    images: torch.Tensor,
    judge: DigitsJudge | None = None,
    value_range: tuple[float, float] = (0.0, 1.0),
    batch_size: int = 1000,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    The judge's 128-d penultimate features and 10 logits of `images` (see `to_judge_input` for accepted inputs).

    Returns:
        `(features, logits)` of shapes `(N, 128)` and `(N, 10)`.
    """
    judge = _resolve_judge(judge).eval()
    outputs = [judge.forward_with_features(chunk) for chunk in to_judge_input(images, value_range).split(batch_size)]
    return torch.cat([f for f, _ in outputs]), torch.cat([logits for _, logits in outputs])


def real_features(
    split: str = "train", judge: DigitsJudge | None = None, digits: Sequence[int] | None = None
) -> torch.Tensor:
    r"""
    Judge features of the real images of `split` (`"train"` is the reference of every FID), optionally only of the
    digits in `digits` (e.g. the nine non-negated digits of a NASA run). Cached per judge and split.
    """
    judge = _resolve_judge(judge)
    key = (id(judge), split)
    if key not in _REAL_FEATURES:
        images, labels = load_digits_split(split)
        _REAL_FEATURES[key] = (judge_features_and_logits(images, judge, value_range=(-1, 1))[0], labels)
    features, labels = _REAL_FEATURES[key]
    if digits is not None:
        features = features[torch.isin(labels, torch.as_tensor(list(digits)))]
    return features


def score_images(
    images: torch.Tensor,
    labels: torch.Tensor | Sequence[int],
    judge: DigitsJudge | None = None,
    value_range: tuple[float, float] = (0.0, 1.0),
    reference_features: torch.Tensor | None = None,
    k: int = 3,
    matched_n: int | None = NUM_TEST,
) -> dict[str, float]:
    r"""
    Scores generated images against real ones in judge-feature space.

    Args:
        images (`torch.Tensor` of shape `(N, C, H, W)`): the generated images, in `value_range`.
        labels (`torch.Tensor` of shape `(N,)`): the prompted digit of each image.
        reference_features (`torch.Tensor`, *optional*): real features; defaults to `real_features("train")`.
        k (`int`, defaults to 3): neighbourhood size of precision / recall.
        matched_n (`int`, *optional*, defaults to 297): also report `fid_matched`, the FID of `matched_n`-image subsets
            (see `subset_fid`), comparable with the real-test-vs-train floor, whose test split has 297 images.

    Returns:
        `dict` with `fid`, `accuracy`, `precision`, `recall`, `n` (and `fid_matched`, `matched_n`).
    """
    judge = _resolve_judge(judge)
    features, logits = judge_features_and_logits(images, judge, value_range)
    reference = real_features("train", judge) if reference_features is None else reference_features
    precision, recall = precision_recall(reference, features, k=k)
    metrics = {
        "fid": fid_from_features(features, reference),
        "accuracy": prompt_accuracy(logits, torch.as_tensor(labels)),
        "precision": precision,
        "recall": recall,
        "n": len(features),
    }
    if matched_n is not None and 1 < matched_n < len(features):
        metrics.update(fid_matched=subset_fid(features, reference, matched_n), matched_n=matched_n)
    return metrics


def subset_fid(features: torch.Tensor, reference: torch.Tensor, n: int, repeats: int = 10, seed: int = 0) -> float:
    r"""
    Mean FID of `repeats` random `n`-sample subsets of `features` against all of `reference`. FID is biased upwards
    at small `n`, so a generated set is compared with the real-test floor (297 images) at the same `n`.
    """
    generator = torch.Generator().manual_seed(seed)
    subsets = [torch.randperm(len(features), generator=generator)[:n] for _ in range(repeats)]
    return sum(fid_from_features(features[subset], reference) for subset in subsets) / repeats


def evaluate_pipeline(
    pipe_callable: Callable[[list[str], torch.Generator], torch.Tensor],
    prompts: Sequence[str],
    n_per_prompt: int,
    labels: Sequence[int] | None = None,
    judge: DigitsJudge | None = None,
    batch_size: int = 100,
    seed: int = 0,
    value_range: tuple[float, float] = (0.0, 1.0),
    reference_features: torch.Tensor | None = None,
    return_images: bool = False,
) -> dict:
    r"""
    Generates `n_per_prompt` images for each prompt and scores them with `score_images`.

    Args:
        pipe_callable (`Callable`): `pipe_callable(prompts, generator)` returns images `(len(prompts), C, H, W)` in
            `value_range`, e.g. `lambda p, g: pipe(p, generator=g, output_type="pt").images`.
        prompts (`Sequence[str]`): e.g. `digit_prompts()`.
        n_per_prompt (`int`): images per prompt (N = `len(prompts) * n_per_prompt`, balanced).
        labels (`Sequence[int]`, *optional*): the digit of each prompt; defaults to `range(len(prompts))`.
        batch_size (`int`, defaults to 100): prompts per call of `pipe_callable`.
        seed (`int`, defaults to 0): seeds the single generator passed to every call.
        return_images (`bool`, defaults to `False`): also return the images (`"images"`) and labels (`"labels"`).

    Returns:
        `dict`: the metrics of `score_images` plus `seconds` (generation wall time) and `images_per_second`.
    """
    if n_per_prompt < 1:
        raise ValueError(f"`n_per_prompt` must be >= 1, got {n_per_prompt}.")
    labels = list(range(len(prompts))) if labels is None else list(labels)
    if len(labels) != len(prompts):
        raise ValueError(f"`labels` ({len(labels)}) must give one digit per prompt ({len(prompts)}).")
    all_prompts = [p for p in prompts for _ in range(n_per_prompt)]
    all_labels = torch.tensor([label for label in labels for _ in range(n_per_prompt)])
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    with torch.no_grad():
        images = torch.cat(
            [
                torch.as_tensor(pipe_callable(all_prompts[i : i + batch_size], generator)).float().cpu()
                for i in range(0, len(all_prompts), batch_size)
            ]
        )
    seconds = time.perf_counter() - start
    metrics = score_images(images, all_labels, judge, value_range, reference_features)
    metrics.update(seconds=seconds, images_per_second=len(images) / seconds)
    if return_images:
        metrics.update(images=images, labels=all_labels)
    return metrics


def save_image_grid(
    images: torch.Tensor,
    path: str,
    nrow: int = 10,
    value_range: tuple[float, float] = (0.0, 1.0),
    scale: int = 4,
    row_labels: Sequence[str] | None = None,
    column_labels: Sequence[str] | None = None,
) -> None:
    r"""
    Saves `images` `(N, C, H, W)` as one grayscale PNG grid, `nrow` images per row, upscaled `scale` times; with
    `row_labels` (one per row) written in a margin on the left and `column_labels` (one per column) above.
    """
    from PIL import Image, ImageDraw, ImageFont

    low, high = value_range
    images = ((torch.as_tensor(images).float().cpu().clamp(low, high) - low) / (high - low)).mean(dim=1).numpy()
    n, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"`row_labels` needs one label per row ({rows}), got {len(row_labels)}.")
    if column_labels is not None and len(column_labels) != nrow:
        raise ValueError(f"`column_labels` needs one label per column ({nrow}), got {len(column_labels)}.")
    grid = np.ones((rows * (h + 1) + 1, nrow * (w + 1) + 1), dtype=np.float32)
    for i, image in enumerate(images):
        r, c = divmod(i, nrow)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = image
    grid = np.kron(grid, np.ones((scale, scale), dtype=np.float32))
    picture = Image.fromarray((grid.clip(0, 1) * 255).round().astype(np.uint8))
    if row_labels is not None or column_labels is not None:
        try:
            font = ImageFont.load_default(size=max(10, 2 * scale))
        except TypeError:  # Pillow < 10.1: the fixed-size bitmap font
            font = ImageFont.load_default()
        pad = scale
        left = pad + max((int(font.getlength(text)) for text in row_labels or []), default=-pad)
        top = font.getbbox("0")[3] + 2 * pad if column_labels is not None else 0
        labelled = Image.new("L", (left + pad + picture.width, top + picture.height), 255)
        labelled.paste(picture, (left + pad, top))
        draw = ImageDraw.Draw(labelled)
        cell_h, cell_w = (h + 1) * scale, (w + 1) * scale
        for r, text in enumerate(row_labels or []):
            draw.text((pad, top + scale + r * cell_h + (h * scale) // 2), text, fill=0, font=font, anchor="lm")
        for c, text in enumerate(column_labels or []):
            draw.text((left + pad + scale + c * cell_w + (w * scale) // 2, pad), text, fill=0, font=font, anchor="mt")
        picture = labelled
    picture.save(path)


def teacher_sampler(pipe, sampler: str, guidance_scale: float) -> tuple[Callable, int]:
    r"""
    A `pipe_callable` for `evaluate_pipeline` that runs a `StableDiffusionPipeline` with `sampler` (`"dpm++:25"`:
    `DPMSolverMultistepScheduler`, `"ddpm:100"`: `DDPMScheduler`, both from the pipeline's scheduler config) at
    `guidance_scale` (1 = no CFG), and its NFE per image (UNet evaluations, doubled under CFG).
    """
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    name, steps = sampler.split(":")
    scheduler_class = {"dpm++": DPMSolverMultistepScheduler, "ddpm": DDPMScheduler}[name]
    scheduler = scheduler_class.from_config(pipe.scheduler.config)

    # a PixArt teacher's bins are for 256-2048 px images: the digits DiT samples at its own 8x8 size
    # (and its caption cleaning needs bs4 / ftfy, which it would warn about on every call)
    accepted = inspect.signature(pipe.__call__).parameters
    extra = {"use_resolution_binning": False, "clean_caption": False} if "use_resolution_binning" in accepted else {}

    def pipe_callable(prompts: list[str], generator: torch.Generator) -> torch.Tensor:
        pipe.scheduler = scheduler
        output = pipe(
            prompts,
            num_inference_steps=int(steps),
            guidance_scale=guidance_scale,
            generator=generator,
            output_type="pt",
            **extra,
        )
        return output.images

    return pipe_callable, int(steps) * (2 if guidance_scale > 1 else 1)


_teacher_sampler = teacher_sampler  # the name benchmark.py imports


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher_dir", required=True)
    parser.add_argument("--judge_dir", required=True)
    parser.add_argument("--output_json", default=None)
    parser.add_argument(
        "--grid_dir", default=None, help="where a PNG grid and the samples (.pt) of each sampler are written"
    )
    parser.add_argument("--n_per_prompt", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["dpm++:25@1.0", "dpm++:25@2.0", "ddpm:100@1.0"],
        help="sampler:steps@guidance_scale (guidance 1.0 = no CFG)",
    )
    args = parser.parse_args(argv)

    from diffusers import StableDiffusionPipeline

    torch.manual_seed(args.seed)
    judge = load_judge(args.judge_dir)
    pipe = StableDiffusionPipeline.from_pretrained(args.teacher_dir)
    pipe.set_progress_bar_config(disable=True)
    train_features = real_features("train", judge)
    test_features = real_features("test", judge)
    test_precision, test_recall = precision_recall(train_features, test_features)
    results = {
        "floor": {
            "fid_test_vs_train": fid_from_features(test_features, train_features),
            "precision_test_vs_train": test_precision,
            "recall_test_vs_train": test_recall,
        }
    }
    for config in args.configs:
        sampler, guidance_scale = config.split("@")
        pipe_callable, nfe = teacher_sampler(pipe, sampler, float(guidance_scale))
        metrics = evaluate_pipeline(
            pipe_callable, digit_prompts(), args.n_per_prompt, judge=judge, batch_size=args.batch_size,
            seed=args.seed, return_images=args.grid_dir is not None,
        )  # fmt: skip
        if args.grid_dir is not None:
            os.makedirs(args.grid_dir, exist_ok=True)
            name = config.replace(":", "_")
            samples = {"images": metrics.pop("images"), "labels": metrics.pop("labels")}
            torch.save(samples, os.path.join(args.grid_dir, f"{name}.pt"))
            # one row per digit, its first 10 samples
            images = samples["images"].unflatten(0, (10, args.n_per_prompt))[:, :10].flatten(0, 1)
            save_image_grid(images, os.path.join(args.grid_dir, f"{name}.png"))
        metrics["nfe"] = nfe
        results[config] = metrics
        print(f"{config}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()), flush=True)

    if args.output_json is not None:
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=2)
    print(f"fid_floor_test_vs_train: {results['floor']['fid_test_vs_train']:.4f}")
    for config in args.configs:
        for name in ("fid", "fid_matched", "accuracy", "precision", "recall", "images_per_second"):
            if name in results[config]:
                print(f"{config} {name}: {results[config][name]:.4f}")
    return results


if __name__ == "__main__":
    main()
