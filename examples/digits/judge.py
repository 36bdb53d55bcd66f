"""The digits judge: a small CNN classifier whose penultimate features define digits-FID and precision / recall.

    python examples/digits/judge.py --output_dir /work/digits_artifacts/judge

Trained on the train split only (15 epochs); the held-out accuracy on the test split is printed and stored in the
saved `config.json` next to `model.safetensors`.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from digits_data import load_digits_split
from safetensors.torch import load_file, save_file
from torch import nn


__all__ = ["DigitsJudge", "load_judge_model", "main", "save_judge", "train_judge"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class DigitsJudge(nn.Module):
    r"""
    Two 3x3 convolutions (32 and 64 channels, ReLU), a 2x2 max-pool, a 128-d ReLU feature layer and a linear classifier.

    Input: `(N, 1, 8, 8)` images in `[-1, 1]`. `forward` returns logits `(N, num_classes)`; `features` the 128-d
    penultimate activations.
    """

    def __init__(self, channels: tuple[int, int] = (32, 64), feature_dim: int = 128, num_classes: int = 10):
        super().__init__()
        self.config = {"channels": list(channels), "feature_dim": feature_dim, "num_classes": num_classes}
        self.conv1 = nn.Conv2d(1, channels[0], 3, padding=1)
        self.conv2 = nn.Conv2d(channels[0], channels[1], 3, padding=1)
        self.fc = nn.Linear(channels[1] * 4 * 4, feature_dim)
        self.dropout = nn.Dropout(0.25)
        self.classifier = nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        hidden = F.relu(self.conv2(F.relu(self.conv1(images))))
        hidden = F.max_pool2d(hidden, 2).flatten(1)
        return F.relu(self.fc(hidden))

    def forward_with_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(images)
        return features, self.classifier(self.dropout(features))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(images)[1]


def train_judge(
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int = 15,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    seed: int = 0,
) -> DigitsJudge:
    r"""Trains a `DigitsJudge` with Adam and cross-entropy on `images` `(N, 1, 8, 8)` in `[-1, 1]` and `labels`."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = DigitsJudge()
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    model.train()
    for epoch in range(epochs):
        permutation = torch.randperm(len(images), generator=generator)
        total = 0.0
        for batch in permutation.split(batch_size):
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        print(f"epoch {epoch + 1}/{epochs}: loss {total / len(images):.4f}")
    return model.eval()


@torch.no_grad()
def accuracy(model: DigitsJudge, images: torch.Tensor, labels: torch.Tensor) -> float:
    r"""Classification accuracy of `model` on `(images, labels)`."""
    return float((model.eval()(images).argmax(1) == labels).float().mean())


def save_judge(model: DigitsJudge, save_directory: str, **extra_config) -> None:
    r"""Saves `model` as `model.safetensors` + `config.json` (the architecture plus `extra_config`, e.g. accuracy)."""
    os.makedirs(save_directory, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(save_directory, WEIGHTS_NAME))
    with open(os.path.join(save_directory, CONFIG_NAME), "w") as f:
        json.dump({**model.config, **extra_config}, f, indent=2)


def load_judge_model(path: str) -> DigitsJudge:
    r"""Loads a judge saved by `save_judge` (in eval mode)."""
    with open(os.path.join(path, CONFIG_NAME)) as f:
        config = json.load(f)
    model = DigitsJudge(tuple(config["channels"]), config["feature_dim"], config["num_classes"])
    model.load_state_dict(load_file(os.path.join(path, WEIGHTS_NAME)))
    return model.eval()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    train_images, train_labels = load_digits_split("train")
    test_images, test_labels = load_digits_split("test")
    model = train_judge(train_images, train_labels, args.epochs, args.batch_size, args.learning_rate, args.seed)
    results = {
        "train_accuracy": accuracy(model, train_images, train_labels),
        "test_accuracy": accuracy(model, test_images, test_labels),
        "epochs": args.epochs,
        "seed": args.seed,
        "train_seconds": round(time.perf_counter() - start, 2),
    }
    save_judge(model, args.output_dir, **results)
    for name, value in results.items():
        print(f"{name}: {value}")
    return results


if __name__ == "__main__":
    main()
