"""Image-caption data for the real-data scripts (consistency tuning): a `datasets` table read as diffusers' scripts do.

`--train_data_dir` is an imagefolder (images plus a `metadata.jsonl` / `.csv` with `file_name` and a caption column),
`--dataset_name` a local `datasets` directory (`save_to_disk`) or a Hub dataset id; `--image_column` and
`--caption_column` name the columns. Images are converted to the VAE's channel count, resized (shorter side) to
`--resolution`, centre-cropped and scaled to `[-1, 1]`, as in diffusers' `train_text_to_image.py` (flips with
`--random_flip`). Batches are lists of dataset indices from `prompt_batches` (resumable, rank-independent); every random
draw of the data (flips, the VAE posterior sample, reference draws) comes from the step's generator, so a resumed run
sees the same latents as an uninterrupted one.
"""

from __future__ import annotations

import numpy as np
import torch

from .data import PROMPT_COLUMNS, load_table
from .errors import TrainingArgumentError


__all__ = ["ImageCaptionDataset", "encode_images"]


class ImageCaptionDataset:
    r"""
    Images and captions of a `datasets.Dataset`, with each caption's rows (the condition groups SCT's reference batch
    is drawn from).

    Args:
        dataset (`datasets.Dataset`): the table.
        image_column, caption_column (`str`): its columns (`caption_column=None`: the first of `prompt`, `text`,
            `caption`).
        resolution (`int`, *optional*): the square training size in pixels; `channels` (defaults to 3) the VAE's input
            channels (1: grayscale `"L"`, 3: `"RGB"`). Both can be set later from the teacher with `for_vae`.
        random_flip (`bool`): flip horizontally with probability 0.5.
        source (`str`): the flag and value named in errors.
    """

    def __init__(
        self, dataset, *, image_column: str = "image", caption_column: str | None = None, resolution: int | None = None,
        channels: int = 3, random_flip: bool = False, source: str = "the dataset",
    ):  # fmt: skip
        names = dataset.column_names
        if image_column not in names:
            raise TrainingArgumentError(f"`--image_column` {image_column!r} is not in {source}; its columns are {names}.")
        if caption_column is None:
            caption_column = next((name for name in PROMPT_COLUMNS if name in names), None)
            if caption_column is None:
                raise TrainingArgumentError(f"{source} has columns {names}; pass `--caption_column` (one of them).")
        elif caption_column not in names:
            raise TrainingArgumentError(
                f"`--caption_column` {caption_column!r} is not in {source}; its columns are {names}."
            )
        if len(dataset) == 0:
            raise TrainingArgumentError(f"{source} holds no images.")
        self.dataset, self.image_column, self.random_flip = dataset, image_column, random_flip
        self.for_vae(channels, resolution)
        captions = dataset[caption_column]
        if any(isinstance(c, (list, tuple)) for c in captions):
            raise TrainingArgumentError(
                f"`--caption_column` {caption_column!r} of {source} holds lists of captions; keep one caption per image "
                "(e.g. `dataset.map(lambda row: {'text': row['text'][0]})`)."
            )
        self.captions = [str(c).strip() for c in captions]
        groups: dict[str, list[int]] = {}
        for index, caption in enumerate(self.captions):
            groups.setdefault(caption, []).append(index)
        self.groups = {caption: torch.tensor(rows) for caption, rows in groups.items()}
        ids = {caption: i for i, caption in enumerate(groups)}
        self.group_ids = torch.tensor([ids[c] for c in self.captions])  # (N,) condition id of each row

    def for_vae(self, channels: int, resolution: int | None) -> ImageCaptionDataset:
        r"""Sets the images' channel count (the VAE's `in_channels`: 1 or 3) and square size in pixels."""
        if channels not in (1, 3):
            raise TrainingArgumentError(f"the teacher's VAE takes {channels} image channels; 1 or 3 are supported.")
        self.mode, self.resolution = "L" if channels == 1 else "RGB", resolution
        return self

    @classmethod
    def from_args(cls, args) -> ImageCaptionDataset:
        r"""The dataset of `--train_data_dir` (an imagefolder) or `--dataset_name`, read with `datasets`."""
        import datasets

        if args.train_data_dir:
            source = f"`--train_data_dir` {args.train_data_dir!r}"
            dataset = datasets.load_dataset("imagefolder", data_dir=args.train_data_dir, split="train")
        elif args.dataset_name:
            source = f"`--dataset_name` {args.dataset_name!r}"
            dataset = load_table(args.dataset_name)
        else:
            raise TrainingArgumentError(
                "this script trains on images: pass `--train_data_dir` (an imagefolder with metadata.jsonl) or "
                "`--dataset_name` (a `datasets` directory or Hub id), not `--train_prompts`."
            )
        return cls(
            dataset, image_column=args.image_column, caption_column=args.prompt_column, random_flip=args.random_flip,
            source=source,
        )  # fmt: skip

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def indices(self) -> list[int]:
        r"""`0 .. N-1`, the examples `Distillation.setup` draws batches from."""
        return list(range(len(self)))

    def flips(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        r"""`(batch_size,)` booleans: which images of a global batch `--random_flip` flips (all `False` without it)."""
        draws = torch.rand(batch_size, generator=generator) < 0.5
        return draws if self.random_flip else torch.zeros_like(draws)

    def pixels(self, indices, flips: torch.Tensor | None = None) -> torch.Tensor:
        r"""The images at `indices` as `(n, C, resolution, resolution)` float32 in `[-1, 1]`, flipped where `flips`."""
        from PIL import Image

        size, batch = self.resolution, []
        flips = torch.zeros(len(indices), dtype=torch.bool) if flips is None else flips
        for index, flip in zip(indices, flips.tolist()):
            image = self.dataset[int(index)][self.image_column].convert(self.mode)
            scale = size / min(image.size)
            width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
            image = image.resize((width, height), Image.BILINEAR)
            left, top = (width - size) // 2, (height - size) // 2
            image = image.crop((left, top, left + size, top + size))
            array = np.asarray(image, dtype=np.float32).reshape(size, size, -1) / 127.5 - 1
            tensor = torch.from_numpy(array).permute(2, 0, 1)
            batch.append(tensor.flip(-1) if flip else tensor)
        return torch.stack(batch)

    def references(self, indices, size: int, generator: torch.Generator) -> torch.Tensor:
        r"""`(len(indices), size)` rows drawn uniformly, with replacement, from each index's caption group."""
        if size == 0:  # nothing to draw (a zero-size draw leaves the generator as it is)
            return torch.empty(len(indices), 0, dtype=torch.long)
        rows = []
        for index in indices:
            group = self.groups[self.captions[int(index)]]
            rows.append(group[torch.randint(len(group), (size,), generator=generator)])
        return torch.stack(rows) if rows else torch.empty(0, size, dtype=torch.long)


@torch.no_grad()
def encode_images(vae, pixels: torch.Tensor, noise: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    r"""
    Latents `z = (mean + std noise - shift_factor) * scaling_factor` of `pixels` (`(n, C, H, W)` in `[-1, 1]`): the
    VAE posterior sampled with the given `noise` (latent-shaped, drawn by the caller from the step's generator, so
    reproducible across devices and resumes). Returned in float32 on `noise`'s device.
    """
    posterior = vae.encode(pixels.to(device=noise.device, dtype=dtype)).latent_dist
    sample = posterior.mean.float() + posterior.std.float() * noise.float()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (sample - shift) * vae.config.scaling_factor
