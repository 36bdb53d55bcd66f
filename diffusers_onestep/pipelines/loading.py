"""Loading helpers shared by our pipelines: Hub downloads that accept our components, safetensors only."""

from __future__ import annotations

import os

import huggingface_hub


__all__ = ["OneStepLoadingMixin"]

# Pickle-based and foreign formats are never fetched: weights load from safetensors only.
_IGNORE_PATTERNS = ["*.bin", "*.ckpt", "*.pt", "*.pth", "*.pkl", "*.msgpack", "*.h5", "*.onnx", "*.onnx_data"]


class OneStepLoadingMixin:
    r"""
    Makes `from_pretrained` work with Hub ids for pipelines whose `model_index.json` names `diffusers_onestep`
    components, and loads weights from safetensors only.

    diffusers 0.42's `DiffusionPipeline.download` refuses components it cannot find inside diffusers or transformers
    ("scheduler/<module>.py does not exist"), so the repository snapshot is fetched with
    `huggingface_hub.snapshot_download` and then loaded as a local directory.
    """

    @classmethod
    def download(cls, pretrained_model_name: str, **kwargs) -> str:
        r"""Downloads (or finds in the cache) a snapshot of the repository and returns its local folder."""
        variant = kwargs.get("variant")
        ignore_patterns = list(_IGNORE_PATTERNS)
        if variant is None:
            # skip other variants' weights (e.g. `*.fp16.safetensors`) when the default weights are asked for
            ignore_patterns.append("*.*.safetensors")
        return huggingface_hub.snapshot_download(
            pretrained_model_name,
            revision=kwargs.get("revision"),
            cache_dir=kwargs.get("cache_dir"),
            token=kwargs.get("token"),
            local_files_only=bool(kwargs.get("local_files_only")),
            force_download=bool(kwargs.get("force_download")),
            ignore_patterns=ignore_patterns,
            library_name="diffusers-onestep",
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        r"""
        Loads the pipeline from a local directory or a Hub id (like `DiffusionPipeline.from_pretrained`, whose keyword
        arguments it accepts). `use_safetensors` is forced on: pickled weights are never loaded.
        """
        if kwargs.get("use_safetensors") is False:
            raise ValueError("`use_safetensors` must be True (or left unset): weights load from safetensors only.")
        kwargs["use_safetensors"] = True
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
