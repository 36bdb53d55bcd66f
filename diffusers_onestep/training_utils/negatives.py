"""NASA-T: distillation with negative prompts (SNOOPI v3, arXiv 2412.02687; METHODS.md section 3).

Each iteration draws one negative prompt per sample from a user's list and one NASA scale `alpha` for the iteration.
Three roles use the negative differently (the script wires them; nothing here knows the loss):

- the frozen teacher's CFG takes the negative as its unconditional branch (`PGSwiftBrushLoss.generator_loss(...,
  negative_prompt_embeds=)`); the fake score keeps the empty prompt;
- the student runs with NASA on the negative at `alpha` (`student_nasa`): `Z = Z+ - alpha Z-` in every
  cross-attention layer, the negative as those layers see it (`BackboneAdapter.nasa_negative`: for PixArt after the
  caption projection; for SDXL only the cross-attention text, pooled embeddings and time ids stay positive).

What the paper leaves unspecified (*unverified* choices): negatives are drawn uniformly with replacement,
independently of the positive prompt (a negative may name the positive's own concept); every sample gets one (no
"no negative" rate); `alpha ~ U(alpha_min, alpha_max)` is one value per iteration, shared by the batch (SNOOPI v3:
"per iteration"), `U(0, 1)` by default and exposed as `--nasa_scale_min` / `--nasa_scale_max`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from ..attention.nasa import nasa_attention
from ..models.backbones import backbone_for
from .errors import TrainingArgumentError


__all__ = ["NASA_T_SCALE_RANGE", "NegativePromptSampler", "load_negative_prompts", "student_nasa"]

NASA_T_SCALE_RANGE = (0.0, 1.0)  # alpha ~ U(0, 1): SNOOPI v3's NASA-T


def load_negative_prompts(path: str, argument: str = "--negative_prompts") -> list[str]:
    r"""
    Reads a text file of negative prompts, one per line (surrounding whitespace stripped, blank lines ignored).
    Raises `TrainingArgumentError` naming `argument` when the file is missing, not UTF-8 text, or holds none.
    """
    if not os.path.isfile(path):
        raise TrainingArgumentError(
            f"`{argument}` {path!r}: no such file (pass a text file with one negative prompt per line)."
        )
    try:
        with open(path, encoding="utf-8") as file:
            prompts = [line.strip() for line in file]
    except UnicodeDecodeError as error:
        raise TrainingArgumentError(f"`{argument}` {path!r} is not UTF-8 text ({error.reason}).") from error
    prompts = [p for p in prompts if p]
    if not prompts:
        raise TrainingArgumentError(f"`{argument}` {path!r} holds no negative prompts (blank lines are ignored).")
    return prompts


class NegativePromptSampler:
    r"""
    NASA-T's draws for one iteration: one negative per sample, uniformly with replacement, and one NASA scale
    `alpha ~ U(alpha_min, alpha_max)` for the whole iteration. Draws come from the given generator only (the loop's
    `(seed, micro_step)` generator), so a resumed or multi-process run draws what one uninterrupted process draws.

    Args:
        prompts (`list[str]`): the negative prompts (see `load_negative_prompts`).
        scale_range (`tuple[float, float]`, defaults to `(0.0, 1.0)`): `(alpha_min, alpha_max)`, `--nasa_scale_min`
            and `--nasa_scale_max`.
    """

    def __init__(self, prompts: list[str], scale_range: tuple[float, float] = NASA_T_SCALE_RANGE):
        if not prompts:
            raise TrainingArgumentError("`--negative_prompts` holds no negative prompts.")
        low, high = scale_range
        if not 0 <= low <= high:
            raise TrainingArgumentError(
                f"NASA-T needs 0 <= `--nasa_scale_min` <= `--nasa_scale_max`, got {low:g} and {high:g}."
            )
        self.prompts, self.scale_range = list(prompts), (float(low), float(high))

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> tuple[list[str], float]:
        r"""`(negatives, alpha)`: `batch_size` negative prompts (the global batch) and this iteration's NASA scale."""
        index = torch.randint(len(self.prompts), (batch_size,), generator=generator).tolist()
        low, high = self.scale_range
        alpha = low + (high - low) * float(torch.rand((), generator=generator))
        return [self.prompts[i] for i in index], alpha


def student_nasa(student, negative: dict, scale: float) -> Callable[[], AbstractContextManager]:
    r"""
    NASA on the student's cross-attention with the negative conditioning `negative` at `scale`, as a factory of
    context managers: enter one around the student's forward **and** one around its backward (gradient checkpointing
    recomputes the forward there, and it must recompute it with NASA). Both bind the same negative features, computed
    once here with the student's own network (PixArt: its caption projection, so gradients reach it). Outside these
    blocks the network has its own processors back, which matters when the student is a LoRA adapter on the UNet that
    the teacher and the fake score also run.

    Args:
        student (`AdapterView` or `torch.nn.Module`): the student (a view is activated first; its `base` is adapted).
        negative (`dict`): the conditioning dict of the negative prompts, `(batch, ...)` (`encode_prompts`).
        scale (`float`): NASA's `alpha`.
    """
    if hasattr(student, "activate"):
        student.activate()
    network = getattr(student, "base", student)
    features, mask = backbone_for(network).nasa_negative(network, negative)
    return lambda: nasa_attention(network, features, scale, negative_attention_mask=mask)
