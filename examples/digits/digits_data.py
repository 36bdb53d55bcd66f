"""The digits world: scikit-learn's handwritten digits, one fixed split, and the captions the models learn from.

Images stay 8x8 (the resolution `load_digits` ships): upsampling adds no information, multiplies every network's cost
by the square of the factor on a 2-core CPU, and a two-level UNet (8x8 -> 4x4) has enough room at 8x8. Pixels are
stored as 0..16 integers by scikit-learn; tensors here are scaled to `[-1, 1]` (Stable Diffusion's image range) and the
PNG files of `prepare_data.py` to `round(v * 255 / 16)`.

Captions: every image gets either a digit caption from `CAPTION_TEMPLATES` or, for `GENERIC_SHARE` of each digit's
images, the generic `GENERIC_CAPTION` ("a handwritten digit"), so that "generic prompt minus negative prompt" is a
meaningful request (NASA).
"""

from __future__ import annotations

import numpy as np
import torch


__all__ = [
    "CAPTION_TEMPLATES",
    "DIGIT_WORDS",
    "GENERIC_CAPTION",
    "GENERIC_SHARE",
    "NUM_TEST",
    "SPLIT_SEED",
    "TOKENIZER_WORDS",
    "assign_captions",
    "caption_for_label",
    "digit_prompt",
    "digit_prompts",
    "load_digits_arrays",
    "load_digits_split",
    "random_captions",
    "split_indices",
]

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CAPTION_TEMPLATES = (
    "a handwritten digit {word}",
    "the number {numeral}",
    "{numeral}",
    "a photo of the digit {word}",
    "the handwritten number {word}",
)
GENERIC_CAPTION = "a handwritten digit"
GENERIC_SHARE = 0.2
# words that become single tokens of the digits tokenizer (numerals are single byte tokens already)
TOKENIZER_WORDS = sorted(
    set(DIGIT_WORDS) | {w for t in CAPTION_TEMPLATES for w in t.split() if not w.startswith("{")} | {"image"}
)
SPLIT_SEED = 0
NUM_TEST = 297
_MAX_PIXEL = 16.0


def caption_for_label(label: int, template_index: int = 0) -> str:
    r"""The caption of digit `label` written with template `CAPTION_TEMPLATES[template_index]`."""
    if not 0 <= int(label) <= 9:
        raise ValueError(f"`label` must be a digit in 0..9, got {label}.")
    template = CAPTION_TEMPLATES[template_index % len(CAPTION_TEMPLATES)]
    return template.format(word=DIGIT_WORDS[int(label)], numeral=str(int(label)))


def digit_prompt(label: int) -> str:
    r"""The evaluation prompt of digit `label`: `"a handwritten digit seven"` (the first template)."""
    return caption_for_label(label, 0)


def digit_prompts() -> list[str]:
    r"""The ten evaluation prompts, digit 0 to 9."""
    return [digit_prompt(label) for label in range(10)]


def assign_captions(labels, seed: int = SPLIT_SEED, generic_share: float = GENERIC_SHARE) -> list[str]:
    r"""
    Deterministic, balanced captions: within each digit, the images are shuffled with `seed`; the first
    `round(generic_share * n)` get `GENERIC_CAPTION`, the others cycle through `CAPTION_TEMPLATES`.

    Args:
        labels (array of shape `(N,)`): the digit of each image.

    Returns:
        `list[str]` of length `N`.
    """
    labels = np.asarray(labels)
    captions = [""] * len(labels)
    rng = np.random.RandomState(seed)
    for label in range(10):
        indices = rng.permutation(np.flatnonzero(labels == label))
        num_generic = int(round(generic_share * len(indices)))
        for position, index in enumerate(indices):
            if position < num_generic:
                captions[index] = GENERIC_CAPTION
            else:
                captions[index] = caption_for_label(label, position - num_generic)
    return captions


def random_captions(
    labels, generator: torch.Generator | None = None, generic_share: float = GENERIC_SHARE
) -> list[str]:
    r"""
    Fresh captions drawn from the same distribution as `assign_captions` (generic with probability `generic_share`,
    otherwise a uniformly chosen template): the teacher's caption augmentation.
    """
    labels = torch.as_tensor(labels).long().flatten()
    generic = torch.rand(len(labels), generator=generator) < generic_share
    templates = torch.randint(0, len(CAPTION_TEMPLATES), (len(labels),), generator=generator)
    return [
        GENERIC_CAPTION if is_generic else caption_for_label(int(label), int(template))
        for label, is_generic, template in zip(labels, generic, templates)
    ]


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    r"""All 1,797 digits as `(images uint8 (N, 8, 8) in 0..16, labels int64 (N,))`."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.uint8), digits.target.astype(np.int64)


def split_indices(seed: int = SPLIT_SEED, num_test: int = NUM_TEST) -> dict[str, np.ndarray]:
    r"""
    The fixed stratified split of `load_digits` (1,500 train / 297 test with the defaults).

    Returns:
        `{"train": indices, "test": indices}`, sorted indices into `load_digits()`.
    """
    from sklearn.model_selection import train_test_split

    _, labels = load_digits_arrays()
    train, test = train_test_split(np.arange(len(labels)), test_size=num_test, stratify=labels, random_state=seed)
    return {"train": np.sort(train), "test": np.sort(test)}


def load_digits_split(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    One split as tensors.

    Args:
        split (`str`): `"train"`, `"test"` or `"all"`.

    Returns:
        `(images, labels)`: float32 `(N, 1, 8, 8)` in `[-1, 1]` and int64 `(N,)`.
    """
    images, labels = load_digits_arrays()
    if split != "all":
        if split not in ("train", "test"):
            raise ValueError(f"`split` must be 'train', 'test' or 'all', got {split!r}.")
        indices = split_indices()[split]
        images, labels = images[indices], labels[indices]
    tensor = torch.from_numpy(images.astype(np.float32) / _MAX_PIXEL * 2 - 1).unsqueeze(1)
    return tensor, torch.from_numpy(labels)
