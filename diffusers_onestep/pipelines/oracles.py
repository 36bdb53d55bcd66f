"""Oracles: score generated images, one number per (image, prompt) pair, higher is better.

`AdaptiveCollabPipeline` asks an oracle which of the student's samples are good enough to keep (Starodubcev et al.,
"Your Student is Better Than Expected: Adaptive Teacher-Student Collaboration for Text-Conditional Diffusion Models",
CVPR 2024, Sec. 4; the paper's oracle is ImageReward). The protocol is one call:

    oracle(images, prompts) -> torch.Tensor of shape (batch,)

with `images` a `(batch, 3 or 1, H, W)` float tensor in `[0, 1]` (diffusers' `output_type="pt"`) and `prompts` a list of
`batch` strings. Oracles run batched and under `torch.no_grad()`; scoring never calls the teacher.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch import nn


__all__ = ["CLIPScoreOracle", "CallableOracle", "ImageRewardOracle", "Oracle", "check_oracle_inputs", "check_scores"]


@runtime_checkable
class Oracle(Protocol):
    r"""
    Anything callable as `oracle(images, prompts)` that returns one score per image, higher is better.

    Args:
        images (`torch.Tensor`): `(batch, 3, H, W)` (or grayscale `(batch, 1, H, W)`) float images in `[0, 1]`.
        prompts (`list[str]`): the prompt of each image, `batch` strings.

    Returns:
        `torch.Tensor` of shape `(batch,)`.
    """

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor: ...


def check_oracle_inputs(images: torch.Tensor, prompts: Sequence[str]) -> list[str]:
    r"""
    Raises `ValueError` unless `images` is `(batch, 1 or 3, H, W)` (grayscale VAEs decode to one channel) and
    `prompts` holds `batch` strings.
    """
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images)
        raise ValueError(f"`images` must be a (batch, 1 or 3, H, W) tensor in [0, 1], got {shape}.")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if len(prompts) != images.shape[0] or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"`prompts` must be {images.shape[0]} strings (one per image), got {len(prompts)} items.")
    return prompts


def _rgb(images: torch.Tensor) -> torch.Tensor:
    """Grayscale `(batch, 1, H, W)` images repeated to three channels, for models that expect RGB."""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def check_scores(scores, batch_size: int, name: str = "oracle") -> torch.Tensor:
    r"""Converts an oracle's output to a float32 CPU tensor of shape `(batch_size,)`, or raises `ValueError`."""
    if torch.is_tensor(scores):
        scores = scores.detach().to("cpu", torch.float32)
    else:
        scores = torch.as_tensor(np.asarray(scores, dtype=np.float32))
    if scores.ndim == 2 and scores.shape[1] == 1:
        scores = scores[:, 0]
    if tuple(scores.shape) != (batch_size,):
        raise ValueError(
            f"The {name} must return one score per image, a tensor of shape ({batch_size},); "
            f"got {tuple(scores.shape)}."
        )
    return scores


def _check_batch_size(batch_size: int | None) -> None:
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"`batch_size` must be an integer >= 1 or None (all at once), got {batch_size}.")


def _batched(fn: Callable, images: torch.Tensor, prompts: list[str], batch_size: int | None) -> torch.Tensor:
    """Calls `fn` on consecutive chunks of at most `batch_size` images under `no_grad` and concatenates the scores."""
    size = batch_size or images.shape[0]
    scores = []
    with torch.no_grad():
        for start in range(0, images.shape[0], size):
            chunk = images[start : start + size]
            scores.append(check_scores(fn(chunk, prompts[start : start + size]), chunk.shape[0]))
    return torch.cat(scores)


class CallableOracle:
    r"""
    Wraps any function `fn(images, prompts) -> scores` (a tensor, array or list of `batch` numbers) as an oracle: the
    function is called on chunks of at most `batch_size` images under `torch.no_grad()`, and its output is checked
    and returned as a float32 tensor of shape `(batch,)`.

    Args:
        fn (`Callable`): the scoring function; `images` are `(batch, 3 or 1, H, W)` in `[0, 1]`, as given.
        batch_size (`int`, *optional*): the largest chunk `fn` sees; all images at once by default.

    Example:

    ```py
    >>> brightness = CallableOracle(lambda images, prompts: images.mean(dim=(1, 2, 3)))
    ```
    """

    def __init__(self, fn: Callable[[torch.Tensor, list[str]], torch.Tensor], batch_size: int | None = None):
        if not callable(fn):
            raise ValueError(f"`fn` must be callable as fn(images, prompts), got {type(fn)}.")
        _check_batch_size(batch_size)
        self.fn = fn
        self.batch_size = batch_size

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        prompts = check_oracle_inputs(images, prompts)
        return _batched(self.fn, images, prompts, self.batch_size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(fn={getattr(self.fn, '__name__', self.fn)!r}, batch_size={self.batch_size})"


class _OracleModule(nn.Module):
    """An oracle holding a network: exposes `device` and `dtype`, which `DiffusionPipeline.to()` reads."""

    def _first_tensor(self) -> torch.Tensor:
        for tensor in (*self.parameters(), *self.buffers()):
            if tensor.is_floating_point():
                return tensor
        return torch.empty(0)

    @property
    def device(self) -> torch.device:
        return self._first_tensor().device

    @property
    def dtype(self) -> torch.dtype:
        return self._first_tensor().dtype


class CLIPScoreOracle(_OracleModule):
    r"""
    CLIP score: `100 * cos(image_embedding, text_embedding)` (Hessel et al., 2021, as computed by torchmetrics, but not
    clamped at 0 so that low-scoring images keep their order).

    Images are preprocessed in torch on the model's device, as the processor's image settings say (bicubic resize of
    the shortest edge, center crop, normalisation); prompts are tokenized by the processor's tokenizer (padded,
    truncated to the text model's length). The module can be moved with `.to()` like any `nn.Module`, and moves with
    the pipeline it is given to.

    Args:
        model (`CLIPModel`): a CLIP model (any `transformers` model with `get_image_features` / `get_text_features`).
        processor (`CLIPProcessor`): its processor (tokenizer plus image processor settings).
        batch_size (`int`, defaults to 32): images scored per forward pass.

    Example:

    ```py
    >>> oracle = CLIPScoreOracle.from_pretrained("openai/clip-vit-large-patch14", torch_dtype=torch.float16)
    >>> scores = oracle(images, ["a photo of a cat"] * len(images))
    ```
    """

    def __init__(self, model: nn.Module, processor, batch_size: int = 32):
        super().__init__()
        _check_batch_size(batch_size)
        image_processor = getattr(processor, "image_processor", None)
        tokenizer = getattr(processor, "tokenizer", None)
        if image_processor is None or tokenizer is None:
            raise ValueError("`processor` must have an `image_processor` and a `tokenizer` (a `CLIPProcessor`).")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.resize_to, self.crop_to = _clip_image_sizes(image_processor)
        mean = torch.tensor(image_processor.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(image_processor.image_std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("image_mean", mean, persistent=False)
        self.register_buffer("image_std", std, persistent=False)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        torch_dtype: torch.dtype | None = None,
        batch_size: int = 32,
        **kwargs,
    ) -> CLIPScoreOracle:
        r"""
        Loads a `CLIPModel` and its `CLIPProcessor` from a directory or a Hub id (safetensors weights only).

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): e.g. `"openai/clip-vit-large-patch14"`.
            torch_dtype (`torch.dtype`, *optional*): the model's dtype.
            batch_size (`int`, defaults to 32): images scored per forward pass.
            kwargs: passed to both `from_pretrained` calls (`revision`, `cache_dir`, `local_files_only`, ...).
        """
        from transformers import CLIPModel, CLIPProcessor

        model_kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
        model = CLIPModel.from_pretrained(
            pretrained_model_name_or_path, use_safetensors=True, **model_kwargs, **kwargs
        )
        processor = CLIPProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return cls(model, processor, batch_size=batch_size)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        r"""`(batch, 3, H, W)` images in `[0, 1]` -> normalised `pixel_values` at the model's resolution and dtype."""
        images = images.to(self.image_mean.device, torch.float32)
        height, width = images.shape[-2:]
        if isinstance(self.resize_to, int):
            scale = self.resize_to / min(height, width)
            size = (max(self.crop_to[0], round(height * scale)), max(self.crop_to[1], round(width * scale)))
        else:
            size = self.resize_to
        if size != (height, width):
            images = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)
        top, left = (size[0] - self.crop_to[0]) // 2, (size[1] - self.crop_to[1]) // 2
        images = images[:, :, top : top + self.crop_to[0], left : left + self.crop_to[1]].clamp(0, 1)
        return ((images - self.image_mean) / self.image_std).to(self.model.dtype)

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        max_length = getattr(getattr(self.model.config, "text_config", None), "max_position_embeddings", None)
        text = self.tokenizer(prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        text = {key: value.to(self.image_mean.device) for key, value in text.items()}
        text_embeds = _pooled(self.model.get_text_features(**text))
        image_embeds = _pooled(self.model.get_image_features(pixel_values=self.preprocess(images)))
        # cosine in float32: half-precision norms of 768-d embeddings lose the digits that rank images
        return 100 * F.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        r"""Scores `images` (`(batch, 1 or 3, H, W)` in `[0, 1]`) against `prompts`; returns `(batch,)` float32 on CPU."""
        prompts = check_oracle_inputs(images, prompts)
        return _batched(self._score, _rgb(images), prompts, self.batch_size)


def _pooled(output) -> torch.Tensor:
    """transformers 4 returns the projected embedding; transformers 5 a `BaseModelOutputWithPooling` holding it."""
    return output if torch.is_tensor(output) else output.pooler_output


def _clip_image_sizes(image_processor) -> tuple[int | tuple[int, int], tuple[int, int]]:
    """The resize target (shortest edge, or (height, width)) and the crop size of a CLIP image processor."""
    size = getattr(image_processor, "size", None) or {}
    size = size if isinstance(size, dict) else dict(size)
    if "shortest_edge" in size:
        resize_to = int(size["shortest_edge"])
    elif "height" in size and "width" in size:
        resize_to = (int(size["height"]), int(size["width"]))
    else:
        raise ValueError(f"Unsupported image processor `size` {size}: expected `shortest_edge` or `height`/`width`.")
    crop = getattr(image_processor, "crop_size", None) if getattr(image_processor, "do_center_crop", True) else None
    crop = dict(crop) if crop else None
    if crop is None:
        crop_to = resize_to if isinstance(resize_to, tuple) else (resize_to, resize_to)
    else:
        crop_to = (int(crop["height"]), int(crop["width"]))
    return resize_to, crop_to


class ImageRewardOracle(_OracleModule):
    r"""
    ImageReward (Xu et al., NeurIPS 2023), the oracle of the adaptive-collaboration paper: a human-preference reward of
    a (prompt, image) pair. Needs the optional `image-reward` package (`pip install image-reward`).

    Images are grouped by prompt and each group is scored in one `model.score(prompt, images)` call.

    Args:
        model: a loaded ImageReward model (`ImageReward.load(...)`), or use `from_pretrained`.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if not callable(getattr(model, "score", None)):
            raise ValueError("`model` must be an ImageReward model with a `score(prompt, images)` method.")
        self.model = model.eval() if isinstance(model, nn.Module) else model

    @classmethod
    def from_pretrained(
        cls, name: str = "ImageReward-v1.0", device: str | torch.device = "cpu", download_root: str | None = None
    ) -> ImageRewardOracle:
        r"""
        Loads ImageReward with the `image-reward` package (`ImageReward.load(name, device, download_root)`).

        Args:
            name (`str`, defaults to `"ImageReward-v1.0"`): the checkpoint name or a local checkpoint path.
            device (`str` or `torch.device`, defaults to `"cpu"`): where the model runs.
            download_root (`str`, *optional*): where the package caches its checkpoint.
        """
        try:
            image_reward = importlib.import_module("ImageReward")
        except ImportError as error:
            raise ImportError(
                "`ImageRewardOracle` needs the optional `image-reward` package: `pip install image-reward`. "
                "Or use `CLIPScoreOracle` / `CallableOracle`."
            ) from error
        return cls(image_reward.load(name, device=str(device), download_root=download_root))

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        r"""Scores `images` (`(batch, 1 or 3, H, W)` in `[0, 1]`) against `prompts`; returns `(batch,)` float32 on CPU."""
        prompts = check_oracle_inputs(images, prompts)
        arrays = (_rgb(images).detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round()
        pil_images = [PIL.Image.fromarray(array.astype(np.uint8)) for array in arrays]
        scores = torch.empty(len(prompts), dtype=torch.float32)
        with torch.no_grad():
            for prompt in dict.fromkeys(prompts):
                index = [i for i, p in enumerate(prompts) if p == prompt]
                group = self.model.score(prompt, [pil_images[i] for i in index])
                scores[index] = check_scores(np.atleast_1d(np.asarray(group, dtype=np.float32)), len(index))
        return scores
