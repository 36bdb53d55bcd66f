"""Loading shared by our pipelines: Hub downloads that accept our components, safetensors only, registration.

- `OneStepLoadingMixin`: `from_pretrained` for local directories and Hub ids, safetensors only, with a clear error for
  a directory that holds pickled weights only.
- `load_pipeline`: the one place a teacher (or any diffusers pipeline directory) is loaded from disk or the Hub.
- `register_with_diffusers`: makes `DiffusionPipeline.from_pretrained` and `AutoPipelineForText2Image.from_pretrained`
  return our pipelines (called once by `import diffusers_onestep`).
- `read_student_config`: the scheduler config and `nasa_scale` a saved student carries.
"""

from __future__ import annotations

import glob
import json
import os

import huggingface_hub
from diffusers import DiffusionPipeline
from diffusers.utils import logging


__all__ = [
    "OneStepLoadingMixin",
    "check_safetensors_only",
    "load_pipeline",
    "read_student_config",
    "register_with_diffusers",
]

logger = logging.get_logger(__name__)

# Pickle-based and foreign formats are never fetched: weights load from safetensors only.
_IGNORE_PATTERNS = ["*.bin", "*.ckpt", "*.pt", "*.pth", "*.pkl", "*.msgpack", "*.h5", "*.onnx", "*.onnx_data"]
_PICKLED = ("*.bin", "*.ckpt", "*.pt", "*.pth", "*.pkl")


def check_safetensors_only(path: str | os.PathLike, name: str = "pretrained_model_name_or_path") -> None:
    r"""
    Raises a `ValueError` that says what to do when a local model folder (a pipeline directory or one component's
    folder) holds pickled weights (`.bin`, `.ckpt`, ...) and no `.safetensors` for some component. Hub ids and missing
    paths are left to the loader.
    """
    path = str(path)
    if not os.path.isdir(path):
        return
    folders = [path] + [os.path.join(path, d) for d in sorted(os.listdir(path)) if os.path.isdir(os.path.join(path, d))]
    for folder in folders:
        if not os.path.isfile(os.path.join(folder, "config.json")):
            continue  # not a model folder (pipeline root, scheduler, tokenizer)
        pickled = [f for pattern in _PICKLED for f in glob.glob(os.path.join(folder, pattern))]
        if pickled and not glob.glob(os.path.join(folder, "*.safetensors")):
            names = ", ".join(sorted(os.path.basename(f) for f in pickled))
            subfolder = os.path.relpath(folder, path)
            where = "" if subfolder == "." else f" in `{subfolder}/`"
            raise ValueError(
                f"`{name}`: {path!r} holds only pickled weights{where} ({names}); diffusers-onestep loads weights from "
                "safetensors only (a pickle can run code when it is loaded). If you trust the file, convert it once "
                f"in place: `python -c \"{_conversion_command(folder)}\"`."
            )


def _conversion_command(folder: str) -> str:
    """A one-line command that rewrites a model folder's pickled weights as safetensors, next to them."""
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as file:
        config = json.load(file)
    library, class_name = "diffusers", config.get("_class_name")
    if class_name is None:
        library, class_name = "transformers", (config.get("architectures") or ["AutoModel"])[0]
    return (
        f"from {library} import {class_name}; {class_name}.from_pretrained({folder!r}, use_safetensors=False)"
        f".save_pretrained({folder!r}, safe_serialization=True)"
    )


def load_pipeline(
    pretrained_model_name_or_path: str | os.PathLike, name: str = "pretrained_model_name_or_path", **kwargs
) -> DiffusionPipeline:
    r"""
    Loads a diffusers pipeline (a teacher) with `DiffusionPipeline.from_pretrained(..., use_safetensors=True)`: the one
    place in the library a teacher directory or Hub id is read. A Stable Diffusion safety checker is not loaded.

    Args:
        pretrained_model_name_or_path (`str` or `os.PathLike`): a local pipeline directory or a Hub id.
        name (`str`): the argument name used in error messages.
        kwargs: `DiffusionPipeline.from_pretrained` arguments (`dtype`, `revision`, `variant`, module overrides).
    """
    if kwargs.get("use_safetensors") is False:
        raise ValueError("`use_safetensors` must be True (or left unset): weights load from safetensors only.")
    check_safetensors_only(pretrained_model_name_or_path, name)
    path = str(pretrained_model_name_or_path)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "model_index.json")):
        raise ValueError(
            f"`{name}`: {path!r} is not a diffusers pipeline directory (no `model_index.json`); pass the directory "
            "written by `save_pretrained`, or a Hub id."
        )
    kwargs["use_safetensors"] = True
    index = None
    if os.path.isdir(path):
        with open(os.path.join(path, "model_index.json"), encoding="utf-8") as file:
            index = json.load(file)
    if index is None or "safety_checker" in index:
        kwargs.setdefault("safety_checker", None)
        kwargs.setdefault("requires_safety_checker", False)
    return DiffusionPipeline.from_pretrained(path, **kwargs)


def read_student_config(path: str | os.PathLike | None) -> tuple[dict | None, dict]:
    r"""
    What a saved student says about itself: its scheduler config (when it is a `ConsistencyStudentScheduler`'s) and
    its pipeline config (`nasa_scale`). `path` may be a student pipeline directory, its `unet/` folder, or a LoRA
    student directory (`pytorch_lora_weights.safetensors` next to `scheduler/`). Returns `(scheduler_config, extra)`;
    `(None, {})` for anything else (a Hub id, a bare UNet folder, a state dict).
    """
    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        return None, {}
    path = os.path.abspath(str(path))
    roots = [path]
    if os.path.isfile(os.path.join(path, "config.json")):  # a model folder inside a pipeline directory
        roots.append(os.path.dirname(path))
    for root in roots:
        scheduler_file = os.path.join(root, "scheduler", "scheduler_config.json")
        index_file = os.path.join(root, "model_index.json")
        if not os.path.isfile(scheduler_file) and not os.path.isfile(index_file):
            continue
        scheduler_config = None
        if os.path.isfile(scheduler_file):
            with open(scheduler_file, encoding="utf-8") as file:
                config = json.load(file)
            if config.get("_class_name") == "ConsistencyStudentScheduler":
                scheduler_config = config
        extra = {}
        if os.path.isfile(index_file):
            with open(index_file, encoding="utf-8") as file:
                index = json.load(file)
            if "nasa_scale" in index:
                extra["nasa_scale"] = index["nasa_scale"]
        return scheduler_config, extra
    return None, {}


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
        arguments it accepts). `use_safetensors` is forced on: pickled weights are never loaded, and a directory that
        holds only pickled weights gets an error saying how to convert it.
        """
        if kwargs.get("use_safetensors") is False:
            raise ValueError("`use_safetensors` must be True (or left unset): weights load from safetensors only.")
        kwargs["use_safetensors"] = True
        check_safetensors_only(pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)


_REGISTERED: dict[str, type] = {}


def register_with_diffusers(*pipeline_classes: type, auto_names: dict[str, str] | None = None) -> None:
    r"""
    Makes diffusers' generic loaders find our pipelines, which diffusers 0.42 looks up only inside its own namespace
    (it has no plugin registry). After `import diffusers_onestep`:

    - `DiffusionPipeline.from_pretrained(dir)` resolves `model_index.json`'s `_class_name` (`"OneStepPipeline"`) by
      `getattr(diffusers, name)`: each class is set as an attribute of the `diffusers` module (never replacing one
      of diffusers' own names);
    - `AutoPipelineForText2Image.from_pretrained(dir)` and `.from_pipe(pipe)` find the class through its text-to-image
      mapping, under the names in `auto_names` (e.g. `{"onestep": "OneStepPipeline"}`).

    `DiffusionPipeline.from_pretrained` does not call our `from_pretrained`: it follows diffusers' own rules (safetensors
    preferred, not enforced) and works for local directories only, because its Hub download refuses components
    recorded under a module path outside diffusers (our scheduler). `AutoPipelineForText2Image.from_pretrained` and our
    classes' own `from_pretrained` call our loader: local directories and Hub ids, safetensors enforced.
    """
    import diffusers
    from diffusers.pipelines import auto_pipeline

    for cls in pipeline_classes:
        existing = diffusers.__dict__.get(cls.__name__)
        if existing is not None and existing is not cls and cls.__name__ not in _REGISTERED:
            raise RuntimeError(f"diffusers already defines {cls.__name__}: not replacing it.")
        setattr(diffusers, cls.__name__, cls)
        _REGISTERED[cls.__name__] = cls
    classes = {cls.__name__: cls for cls in pipeline_classes}
    for model_name, class_name in (auto_names or {}).items():
        auto_pipeline.AUTO_TEXT2IMAGE_PIPELINES_MAPPING.setdefault(model_name, classes[class_name])
