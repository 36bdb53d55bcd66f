"""Writes the digits split as two image folders that `datasets.load_dataset("imagefolder", ...)` reads.

    python examples/digits/prepare_data.py --output_dir /work/digits_artifacts/data

Layout: `<output_dir>/{train,test}/<sklearn index>.png` (8x8 grayscale) and one `metadata.jsonl` per split with
`file_name`, `text` (the caption) and `label` (the digit).
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter

import numpy as np
from digits_data import assign_captions, load_digits_arrays, split_indices
from PIL import Image


__all__ = ["main", "write_split"]


def write_split(directory: str, images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> list[dict]:
    r"""Writes one split's PNGs and `metadata.jsonl` to `directory`; returns the metadata rows."""
    os.makedirs(directory, exist_ok=True)
    captions = assign_captions(labels[indices])
    rows = []
    for index, caption in zip(indices, captions):
        file_name = f"{int(index):04d}.png"
        pixels = np.round(images[index].astype(np.float32) * 255 / 16).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(directory, file_name))
        rows.append({"file_name": file_name, "text": caption, "label": int(labels[index])})
    with open(os.path.join(directory, "metadata.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return rows


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True, help="where the train/ and test/ folders are written")
    args = parser.parse_args(argv)

    images, labels = load_digits_arrays()
    written = {}
    for split, indices in split_indices().items():
        rows = write_split(os.path.join(args.output_dir, split), images, labels, indices)
        captions = Counter(row["text"] for row in rows)
        print(
            f"{split}: {len(rows)} images, {len(captions)} distinct captions, generic {captions['a handwritten digit']}"
        )
        written[split] = rows
    return written


if __name__ == "__main__":
    main()
