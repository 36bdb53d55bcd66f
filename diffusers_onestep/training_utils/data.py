"""Prompt data for data-free distillation: loading prompt lists and a deterministic, resumable batch order.

The batch order is a pure function of `(seed, step)`: every rank computes the same global batch and keeps its own
slice, so a resumed run sees exactly the prompts an uninterrupted run would, and `N` ranks with batch `B` see what one
process with batch `N * B` sees.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch


__all__ = ["PROMPT_COLUMNS", "load_prompts", "load_table", "load_training_prompts", "prompt_batches"]

PROMPT_COLUMNS = ("prompt", "text", "caption")
_TABLE_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _column(dataset, column: str | None, source: str) -> list[str]:
    names = dataset.column_names
    if column is None:
        column = next((name for name in PROMPT_COLUMNS if name in names), None)
        if column is None:
            raise ValueError(f"{source!r} has columns {names}; pass `--prompt_column` (one of them).")
    elif column not in names:
        raise ValueError(f"`--prompt_column` {column!r} is not in {source!r}; its columns are {names}.")
    return [str(p) for p in dataset[column]]


def load_prompts(
    source: str, column: str | None = None, split: str = "train", argument: str = "--train_prompts"
) -> list[str]:
    r"""
    Reads a list of prompts from a text file (one per line), a CSV / JSON / JSON-lines / Parquet column, a dataset
    saved with `Dataset.save_to_disk`, or any path or Hub id `datasets.load_dataset` accepts.

    Args:
        source (`str`): the path or dataset id (`--train_prompts`).
        column (`str`, *optional*): the prompt column; defaults to the first of `prompt`, `text`, `caption`.
        split (`str`, defaults to `"train"`): the split of a dataset with several.
        argument (`str`): the flag named in error messages.

    Returns:
        `list[str]`: the non-empty prompts, in file order.
    """
    if os.path.isfile(source) and os.path.splitext(source)[1].lower() == ".txt":
        with open(source, encoding="utf-8") as f:
            prompts = [line.strip() for line in f]
    else:
        prompts = [p.strip() for p in _column(load_table(source, split, argument), column, source)]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"`{argument}` {source!r} holds no prompts.")
    return prompts


def load_table(source: str, split: str = "train", argument: str = "--dataset_name"):
    r"""
    One split of a `datasets` table: a CSV / JSON / JSON-lines / Parquet file, a `save_to_disk` directory, or any
    path or Hub id `datasets.load_dataset` accepts. Raises `ValueError` naming `argument` for an unknown file type or
    a missing split.
    """
    import datasets

    ext = os.path.splitext(source)[1].lower()
    if os.path.isfile(source) and ext in _TABLE_FORMATS:
        dataset = datasets.load_dataset(_TABLE_FORMATS[ext], data_files=source, split="train")
    elif os.path.isfile(source):
        raise ValueError(f"`{argument}` {source!r}: use .txt, {sorted(_TABLE_FORMATS)} or a dataset.")
    elif os.path.isfile(os.path.join(source, "dataset_info.json")) or os.path.isfile(
        os.path.join(source, "dataset_dict.json")
    ):
        dataset = datasets.load_from_disk(source)
    else:
        dataset = datasets.load_dataset(source)
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise ValueError(f"`{argument}` {source!r} has splits {list(dataset)}, not {split!r}.")
        dataset = dataset[split]
    return dataset


def _imagefolder_captions(data_dir: str, column: str | None) -> list[str]:
    """The captions of an imagefolder directory, read from its metadata files (images are not opened)."""
    import datasets

    metadata = []
    for root, _, names in sorted(os.walk(data_dir)):
        for name in sorted(names):
            if name in ("metadata.jsonl", "metadata.csv", "metadata.parquet"):
                metadata.append(os.path.join(root, name))
    if not metadata:
        raise ValueError(
            f"`--train_data_dir` {data_dir!r} has no metadata.jsonl / metadata.csv / metadata.parquet with captions "
            "(the imagefolder format: one row per image, `file_name` plus a caption column)."
        )
    formats = {os.path.splitext(path)[1] for path in metadata}
    if len(formats) > 1:
        raise ValueError(f"`--train_data_dir` {data_dir!r} mixes metadata formats {sorted(formats)}; keep one.")
    kind = {".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}[formats.pop()]
    dataset = datasets.load_dataset(kind, data_files=metadata, split="train")
    return [p.strip() for p in _column(dataset, column, data_dir)]


def load_training_prompts(args) -> list[str]:
    r"""
    The prompts of a run from its one prompt source: `--train_prompts` (a file or dataset, see `load_prompts`),
    `--dataset_name` (a Hub dataset id or a local `datasets` directory) or `--train_data_dir` (an imagefolder whose
    `metadata.jsonl` / `.csv` / `.parquet` holds the captions; the images are not read). The column is
    `--prompt_column` (alias `--caption_column`), by default the first of `prompt`, `text`, `caption`.
    """
    if args.train_data_dir:
        prompts = [p for p in _imagefolder_captions(args.train_data_dir, args.prompt_column) if p]
        if not prompts:
            raise ValueError(f"`--train_data_dir` {args.train_data_dir!r} holds no captions.")
        return prompts
    if args.dataset_name:
        return load_prompts(args.dataset_name, args.prompt_column, argument="--dataset_name")
    return load_prompts(args.train_prompts, args.prompt_column)


def prompt_batches(
    prompts: list[str], batch_size: int, seed: int | None = None, start: int = 0
) -> Iterator[list[str]]:
    r"""
    Yields batches `start, start + 1, ...` of an endless stream of `prompts`, reshuffled every epoch with a generator
    seeded by `(seed, epoch)`. Batch `i` depends only on `(prompts, batch_size, seed, i)`.

    Args:
        prompts (`list[str]`): the prompts.
        batch_size (`int`): the *global* batch size (all ranks).
        seed (`int`, *optional*): defaults to 0.
        start (`int`, defaults to 0): the index of the first batch (a resumed run's micro-step count).
    """
    num_prompts, seed = len(prompts), seed or 0
    permutations: dict[int, list[int]] = {}
    position = start * batch_size
    while True:
        batch = []
        for p in range(position, position + batch_size):
            epoch = p // num_prompts
            if epoch not in permutations:
                permutations.clear()
                generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
                permutations[epoch] = torch.randperm(num_prompts, generator=generator).tolist()
            batch.append(prompts[permutations[epoch][p % num_prompts]])
        position += batch_size
        yield batch
