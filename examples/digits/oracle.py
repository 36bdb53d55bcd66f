"""The oracle of the adaptive-collaboration benchmark: a second digits classifier, independent of the judge.

    python examples/digits/oracle.py --output_dir /work/digits_artifacts/oracle

`AdaptiveCollabPipeline` asks an oracle which student images to keep. Scoring with the judge itself would let the
benchmark grade its own homework (the judge defines digits-FID and prompt accuracy), so the oracle is a different
network: a narrower `DigitsJudge` (channels (16, 32), 64-d features instead of (32, 64), 128-d), another seed, trained
on the train split only, for a few seconds on a CPU. Its score of an image is the softmax probability of the digit
named in the image's prompt (`prompt_digit`); for a prompt naming no digit (the generic "a handwritten digit"), the
probability of its most likely digit (its confidence).

`DigitsOracle` is a `CallableOracle` around that score; it takes the digits world's one-channel images as they are.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from digits_data import DIGIT_WORDS, load_digits_split
from evaluate import to_judge_input
from judge import CONFIG_NAME, DigitsJudge, accuracy, load_judge_model, save_judge

from diffusers_onestep.pipelines.oracles import CallableOracle


__all__ = [
    "ORACLE_CHANNELS",
    "ORACLE_FEATURE_DIM",
    "ORACLE_SEED",
    "DigitsOracle",
    "load_or_train_oracle",
    "main",
    "prompt_digit",
    "prompted_digit_probability",
    "train_oracle_classifier",
]

ORACLE_CHANNELS = (16, 32)
ORACLE_FEATURE_DIM = 64
ORACLE_SEED = 1


def prompt_digit(prompt: str) -> int | None:
    r"""The digit a prompt names (`"a handwritten digit seven"` -> 7, `"the number 7"` -> 7), or `None`."""
    for token in prompt.lower().replace(",", " ").split():
        if token in DIGIT_WORDS:
            return DIGIT_WORDS.index(token)
        if len(token) == 1 and token.isdigit():
            return int(token)
    return None


def train_oracle_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    channels: tuple[int, int] = ORACLE_CHANNELS,
    feature_dim: int = ORACLE_FEATURE_DIM,
    epochs: int = 12,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    seed: int = ORACLE_SEED,
) -> DigitsJudge:
    r"""
    Trains a `DigitsJudge` of the given width with Adam and cross-entropy (as `judge.train_judge`, which has the judge's
    width built in) on `images` `(N, 1, 8, 8)` in `[-1, 1]` and `labels`; returns it in eval mode.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = DigitsJudge(tuple(channels), feature_dim)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(images), generator=generator).split(batch_size):
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def prompted_digit_probability(classifier: DigitsJudge, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    r"""
    The oracle score: `softmax(classifier(image))[digit named by the prompt]`, or the largest probability when the
    prompt names no digit.

    Args:
        classifier (`DigitsJudge`): the oracle's classifier.
        images (`torch.Tensor` of shape `(N, C, H, W)`): images in `[0, 1]`, `C` 1 or 3 (see `to_judge_input`).
        prompts (`Sequence[str]`): the prompt of each image.

    Returns:
        `torch.Tensor` of shape `(N,)`, in `[0, 1]`.
    """
    probabilities = classifier.eval()(to_judge_input(images)).softmax(dim=1)
    digits = [prompt_digit(p) for p in prompts]
    named = torch.tensor([-1 if d is None else d for d in digits])
    scores = probabilities.max(dim=1).values
    has_digit = named >= 0
    scores[has_digit] = probabilities[has_digit, named[has_digit]]
    return scores


class DigitsOracle(CallableOracle):
    r"""
    `CallableOracle` around `prompted_digit_probability(classifier, ...)` (one- or three-channel images).

    Args:
        classifier (`DigitsJudge`): the oracle's classifier (not the judge).
        batch_size (`int`, *optional*): the largest chunk scored at once.
    """

    def __init__(self, classifier: DigitsJudge, batch_size: int | None = None):
        self.classifier = classifier.eval()
        super().__init__(self._score, batch_size)

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return prompted_digit_probability(self.classifier, images, prompts)


def load_or_train_oracle(path: str | None = None, seed: int = ORACLE_SEED, verbose: bool = False) -> DigitsJudge:
    r"""
    The oracle's classifier: loaded from `path` when it holds one (saved by `save_judge`), otherwise trained on the
    train split (and saved to `path` when given). Training takes a few seconds on a CPU.
    """
    if path is not None and os.path.isfile(os.path.join(path, CONFIG_NAME)):
        return load_judge_model(path)
    start = time.perf_counter()
    images, labels = load_digits_split("train")
    classifier = train_oracle_classifier(images, labels, seed=seed)
    test_images, test_labels = load_digits_split("test")
    info = {
        "train_accuracy": accuracy(classifier, images, labels),
        "test_accuracy": accuracy(classifier, test_images, test_labels),
        "seed": seed,
        "train_seconds": round(time.perf_counter() - start, 2),
    }
    if verbose:
        print(", ".join(f"{k} {v:.4g}" for k, v in info.items()))
    if path is not None:
        save_judge(classifier, path, **info)
    return classifier


def main(argv: list[str] | None = None) -> DigitsJudge:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seed", type=int, default=ORACLE_SEED)
    args = parser.parse_args(argv)
    if os.path.isfile(os.path.join(args.output_dir, CONFIG_NAME)):
        parser.error(f"{args.output_dir} already holds an oracle")
    return load_or_train_oracle(args.output_dir, args.seed, verbose=True)


if __name__ == "__main__":
    main()
