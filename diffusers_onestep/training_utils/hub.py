"""The end of a run: the student saved in diffusers formats, its model card, and the optional Hub upload.

A full student becomes a directory of its backbone's student pipeline (`OneStepPipeline`, `OneStepXLPipeline`,
`OneStepPixArtPipeline`); a LoRA student becomes LoRA weights that pipeline's `load_lora_weights` reads (with the
adapter metadata, so `lora_alpha != r` survives) plus `scheduler/` holding its `t_init`. Both are
written to a hidden `.final.partial` directory and moved into `output_dir` with their commit marker
(`model_index.json`, or the LoRA weights file) last, so a kill never leaves a loadable-looking, incomplete model. The
model card is filled from the template shipped inside the package (`diffusers_onestep/model_cards/`) with Hub metadata
(`library_name`, `pipeline_tag`, `base_model`, `tags`). Secrets never reach the card or the logs: `format_command` and
`mask_secrets` hide the value of any flag whose name says token / secret / password / api_key, any `hf_...` token, and
any secret value passed in. Every Hub request has a timeout and a bounded number of retries (`push_to_hub`); a failed
upload ends with one line saying where the model is saved and the `hf upload` command that uploads it later.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shlex
import shutil
import time
from pathlib import Path

import httpx2
import huggingface_hub
import torch
from accelerate.logging import get_logger
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import _http

from .errors import HubUploadError


__all__ = [
    "MODEL_CARD_DIR",
    "format_command",
    "hub_request_timeout",
    "mask_secrets",
    "push_to_hub",
    "save_model_card",
    "save_student",
    "upload_command",
]

logger = get_logger(__name__)
MODEL_CARD_DIR = Path(__file__).resolve().parents[1] / "model_cards"
_SECRET_FLAG = re.compile(r"^--?[\w-]*(token|secret|password|api[_-]?key)[\w-]*$", re.IGNORECASE)
_HF_TOKEN = re.compile(r"hf_[A-Za-z0-9]{8,}")
_FINAL_PARTIAL = ".final.partial"


def mask_secrets(text: str, secrets: list[str | None] | tuple = ()) -> str:
    r"""`text` with every value in `secrets` and every Hugging Face token (`hf_...`) replaced by `***`."""
    for secret in sorted((s for s in secrets if s and len(s) >= 4), key=len, reverse=True):
        text = text.replace(secret, "***")
    return _HF_TOKEN.sub("***", text)


def format_command(argv: list[str], script: str) -> str:
    r"""
    The launch command of a run, as a shell line, with secrets replaced by `***`: the value of any flag whose name
    contains token, secret, password or api_key (whatever its spelling: `--hub_token`, `--hub-token`, `--HUB_TOKEN=`),
    and any `hf_...` token anywhere.
    """
    shown, hide_next, secrets = [], False, []
    for arg in argv:
        name = arg.split("=", 1)[0]
        if hide_next:
            shown.append("***")
            secrets.append(arg)
            hide_next = False
        elif _SECRET_FLAG.match(arg):
            shown.append(arg)
            hide_next = True
        elif "=" in arg and _SECRET_FLAG.match(name):
            shown.append(name + "=***")
            secrets.append(arg.split("=", 1)[1])
        else:
            shown.append(shlex.quote(arg))
    return mask_secrets(" ".join(["accelerate launch", script, *shown]), secrets)


def _commit_into(partial: str, output_dir: str, marker: str) -> None:
    """Moves the entries of `partial` into `output_dir`, replacing old ones, with `marker` removed first, moved last."""
    old_marker = os.path.join(output_dir, marker)
    if os.path.exists(old_marker):
        os.remove(old_marker)
    names = sorted(os.listdir(partial), key=lambda n: n == marker)
    for name in names:
        target = os.path.join(output_dir, name)
        if os.path.exists(target):
            trash = os.path.join(output_dir, f".{name}.trash")
            shutil.rmtree(trash, ignore_errors=True)
            os.rename(target, trash)
            shutil.rmtree(trash) if os.path.isdir(trash) else os.remove(trash)
        os.rename(os.path.join(partial, name), target)
    os.rmdir(partial)


def save_student(
    output_dir: str,
    *,
    network=None,
    scheduler,
    teacher,
    adapter_name: str | None = None,
    teacher_name_or_path: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    unet=None,
) -> None:
    r"""
    Saves the trained student in diffusers formats (main process only), atomically: into `output_dir/.final.partial`
    first, then moved into `output_dir` with the commit marker (`model_index.json` or
    `pytorch_lora_weights.safetensors`) last. The format is the backbone's student pipeline
    (`TrainingBackbone.student_pipeline`: `OneStepPipeline`, `OneStepXLPipeline` or `OneStepPixArtPipeline`): a full
    pipeline directory, or LoRA weights plus `scheduler/` that its `from_teacher(teacher, lora=output_dir)` loads.

    Args:
        output_dir (`str`): the destination.
        network (`UNet2DConditionModel` or `PixArtTransformer2DModel`): the unwrapped student (full), or the network
            carrying the student adapter (`unet` is its older name).
        scheduler (`ConsistencyStudentScheduler`): the student's scheduler (holds `t_init` and `input_type`).
        teacher (`TeacherComponents`): the teacher pipeline, whose VAE, text encoders and tokenizers a full student
            pipeline holds.
        adapter_name (`str`, *optional*): the student's LoRA adapter; `None` for a full student.
        teacher_name_or_path, revision, variant: where to reload the VAE and text encoders in their stored precision
            when they were cast for training.
    """
    from .backbones import build_student_pipeline
    from .setup import load_teacher

    network = network if network is not None else unet
    backbone = teacher.backbone
    os.makedirs(output_dir, exist_ok=True)
    partial = os.path.join(output_dir, _FINAL_PARTIAL)
    shutil.rmtree(partial, ignore_errors=True)
    if adapter_name is not None:
        backbone.save_lora(partial, network, adapter_name, vae=teacher.vae, scheduler=scheduler)
        scheduler.save_pretrained(os.path.join(partial, "scheduler"))
        marker = "pytorch_lora_weights.safetensors"
    else:
        source = teacher.pipeline
        if teacher_name_or_path is not None and teacher.vae.dtype != torch.float32:
            source = load_teacher(teacher_name_or_path, revision=revision, variant=variant, load_network=False).pipeline
        pipeline = build_student_pipeline(source, network, scheduler, backbone)
        pipeline.save_pretrained(partial, safe_serialization=True)
        marker = "model_index.json"
    _fsync_tree(partial)
    _commit_into(partial, output_dir, marker)


def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())


def _format_metric(value) -> str:
    value = float(value)
    return f"{value:.6g}" if math.isfinite(value) else "n/a"


def save_model_card(
    output_dir: str,
    *,
    base_model: str,
    method_name: str,
    paper: str,
    script: str,
    command: str,
    metrics: dict[str, float],
    hyperparameters: dict,
    t_init: int,
    input_type: str,
    lora_rank: int = 0,
    lora_alpha: int | None = None,
    repo_id: str | None = None,
    validation_images: list[str] | None = None,
    example_prompt: str = "a photo of an astronaut riding a horse",
    tags: list[str] | None = None,
    template: str | os.PathLike | None = None,
    secrets: list[str | None] | tuple = (),
    pipeline_class: str = "OneStepPipeline",
) -> ModelCard:
    r"""
    Writes `output_dir/README.md` (atomically) from the model-card template (`diffusers_onestep/model_cards/
    onestep_student.md`, shipped with the package, by default).

    Args:
        output_dir (`str`): where the student was saved.
        base_model (`str`): the teacher's Hub id, recorded as `base_model` (a local path is shown but not recorded).
        method_name, paper, script, command (`str`): what was trained, how (use `format_command`).
        metrics (`dict`): final logged values; a non-finite value is written as `n/a`, never `nan`.
        hyperparameters (`dict`): settings shown in a table.
        t_init, input_type: the student's scheduler settings, used in the usage snippet.
        lora_rank, lora_alpha: the LoRA student's rank and alpha (`lora_rank=0`: full student).
        repo_id (`str`, *optional*): the Hub repository (defaults to `output_dir`'s name).
        validation_images (`list[str]`, *optional*): images inside `output_dir` to show.
        tags (`list[str]`, *optional*): extra tags.
        template (`str`, *optional*): another jinja2 template.
        secrets (`list[str]`, *optional*): values masked wherever they appear (`mask_secrets`; `hf_...` tokens are
            always masked).
        pipeline_class (`str`, defaults to `"OneStepPipeline"`): the student pipeline class the usage snippet loads
            (`OneStepXLPipeline`, `OneStepPixArtPipeline` for those backbones); the template's `pipeline_class` and
            `network_name` ("UNet", or "transformer" for PixArt).

    Returns:
        The `huggingface_hub.ModelCard`.
    """
    lora = lora_rank > 0
    is_hub_id = not os.path.exists(base_model)
    if not is_hub_id:
        logger.warning(
            f"The teacher {base_model!r} is a local path, which is not valid `base_model` metadata on the Hub: "
            "pass `--hub_base_model <hub id>` to record where it comes from."
        )
    tags = ["text-to-image", "diffusers", "diffusers-onestep", "one-step", "distillation", *(tags or [])]
    tags += ["lora"] if lora else []
    card_data = ModelCardData(
        library_name="diffusers",
        pipeline_tag="text-to-image",
        base_model=base_model if is_hub_id else None,
        tags=list(dict.fromkeys(tags)),
        model_name=repo_id or Path(output_dir).name,
    )
    template = Path(template or MODEL_CARD_DIR / "onestep_student.md")
    if not template.is_file():
        raise FileNotFoundError(f"Model-card template {template} not found: pass `template=` (see {MODEL_CARD_DIR}).")
    card = ModelCard.from_template(
        card_data,
        template_path=str(template),
        model_name=repo_id or Path(output_dir).name,
        repo_id=repo_id or Path(output_dir).name,
        base_model=base_model,
        base_model_url=f"https://huggingface.co/{base_model}" if is_hub_id else base_model,
        method_name=method_name,
        paper=paper,
        script=script,
        command=command,
        metrics={k: _format_metric(v) for k, v in metrics.items()},
        hyperparameters={k: _format_value(v) for k, v in hyperparameters.items()},
        t_init=t_init,
        input_type=input_type,
        lora=lora,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha or lora_rank,
        validation_images=[os.path.relpath(p, output_dir) for p in validation_images or []],
        example_prompt=example_prompt,
        pipeline_class=pipeline_class,
        network_name="transformer" if "PixArt" in pipeline_class else "UNet",
    )
    card = ModelCard(mask_secrets(str(card), secrets))
    path, partial = os.path.join(output_dir, "README.md"), os.path.join(output_dir, ".README.md.partial")
    card.save(partial)
    os.replace(partial, path)
    return card


def _format_value(value):
    if isinstance(value, float):
        return _format_metric(value)
    if isinstance(value, (tuple, list)):  # "(0.5, 4)", not the repr of a tuple of strings "('0.5', '4')"
        inner = ", ".join(str(_format_value(v)) for v in value)
        return f"({inner})" if isinstance(value, tuple) else f"[{inner}]"
    return value


def hub_request_timeout(timeout: float):
    r"""
    A context manager under which every request huggingface_hub makes has `timeout` seconds to connect and between
    bytes (its client has none by default): the client factory (`huggingface_hub.set_client_factory`) is wrapped for
    the duration and restored afterwards.
    """
    previous = getattr(_http, "_GLOBAL_CLIENT_FACTORY", _http.default_client_factory)

    def factory():
        client = previous()
        client.timeout = httpx2.Timeout(timeout)
        return client

    @contextlib.contextmanager
    def scope():
        huggingface_hub.set_client_factory(factory)
        try:
            yield
        finally:
            huggingface_hub.set_client_factory(previous)

    return scope()


def _retryable(error: Exception) -> bool:
    if isinstance(error, (httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError, TimeoutError)):
        return True
    status = getattr(getattr(error, "response", None), "status_code", None)
    return isinstance(error, HfHubHTTPError) and status is not None and (status >= 500 or status == 429)


def _with_retries(call, retries: int, what: str):
    for attempt in range(retries + 1):
        try:
            return call()
        except Exception as error:
            if attempt == retries or not _retryable(error):
                raise
            wait = min(2.0**attempt, 10.0)
            logger.warning(f"{what} failed ({type(error).__name__}); retry {attempt + 1}/{retries} in {wait:g} s.")
            time.sleep(wait)


def upload_command(output_dir: str, repo_id: str, private: bool, ignore_patterns: list[str]) -> str:
    r"""The `hf upload` command that uploads `output_dir` to `repo_id` later, leaving out `ignore_patterns`."""
    parts = ["hf", "upload", repo_id, os.path.abspath(output_dir), ".", "--repo-type", "model"]
    parts += ["--private"] if private else []
    for pattern in ignore_patterns:
        parts += ["--exclude", pattern]
    return shlex.join(parts)


def push_to_hub(
    output_dir: str,
    *,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload one-step student",
    ignore_patterns: list[str] | None = None,
    timeout: float = 60.0,
    retries: int = 2,
) -> str:
    r"""
    Creates (or reuses) the Hub model repository `repo_id` and uploads `output_dir` to it. Returns the repository id.

    Every request has `timeout` seconds to connect and between bytes (`hub_request_timeout`), and each call
    (`create_repo`, `upload_folder`) is retried up to `retries` times on timeouts, network and server errors. Then it
    raises `HubUploadError` with one line saying where the model is saved and the exact `hf upload` command that
    uploads it later; `output_dir` is only read. `token=None` uses `HF_TOKEN` or the `hf auth login` token; a token is
    passed through, never logged.

    Args:
        output_dir (`str`): the saved student.
        repo_id (`str`): the repository.
        token (`str`, *optional*): a Hub token (prefer `HF_TOKEN` / `hf auth login`).
        private (`bool`): create the repository as private.
        ignore_patterns (`list[str]`, *optional*): what not to upload; defaults to checkpoints and hidden files.
        timeout (`float`, defaults to 60): seconds per request (`--hub_timeout`).
        retries (`int`, defaults to 2): retries per call (`--hub_retries`).
    """
    ignore_patterns = list(ignore_patterns or ["checkpoint-*", ".*"])
    try:
        with hub_request_timeout(timeout):
            repo_url = _with_retries(
                lambda: huggingface_hub.create_repo(repo_id, exist_ok=True, private=private, token=token),
                retries,
                "create_repo",
            )
            repo_id = repo_url.repo_id
            _with_retries(
                lambda: huggingface_hub.upload_folder(
                    repo_id=repo_id,
                    folder_path=output_dir,
                    commit_message=commit_message,
                    ignore_patterns=ignore_patterns,
                    token=token,
                ),
                retries,
                "upload_folder",
            )
    except Exception as error:
        reason = mask_secrets((str(error).splitlines() or [""])[0][:200], [token])
        raise HubUploadError(
            f"Hub upload to {repo_id} failed ({type(error).__name__}: {reason}); the model is saved locally at "
            f"{os.path.abspath(output_dir)}. Upload it later with: "
            f"{upload_command(output_dir, repo_id, private, ignore_patterns)}"
        ) from None
    logger.info(f"Uploaded {output_dir} to https://huggingface.co/{repo_id}")
    return repo_id
