"""The training scripts under test, for the shared fault tests (kill / resume, NaN, Hub, token hygiene).

A new script is covered by `tests/test_training_faults.py` by adding one `ScriptCase` to `SCRIPTS`.
"""

import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path


__all__ = [
    "REPO", "SCRIPTS", "SUBPROCESS_ENV", "ScriptCase", "TeacherDirs", "load_script", "save_tiny_teacher",
    "tiny_imagefolder",
]  # fmt: skip

REPO = Path(__file__).resolve().parents[1]
# subprocesses: one thread, as conftest.py sets in-process (two OpenMP threads make tiny models much slower)
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass
class ScriptCase:
    r"""
    A training script and how to drive it on the tiny teacher.

    Args:
        name (`str`): the file name in `training/` without `.py`.
        flags (`list[str]`): the script's own flags for a fast tiny run (shared flags are added by `argv`).
        loss (`tuple[str, str, str]`): `(module, class, method)` of the student's loss, patched to count steps and to
            inject NaN (the method returns `(loss, logs)`).
        backbone (`str`, defaults to `"sd"`): the tiny teacher's backbone (`"sd"`, `"sdxl"`, `"pixart"`).
        slow (`bool`): run only with `-m slow` (the extra backbones of a script already covered on SD).
        negative_prompts (`bool`): also pass `--negative_prompts` (NASA-T), the prompt file doubling as the negatives.
        images (`bool`): a real-data script: the prompts become the captions of an imagefolder (`tiny_imagefolder`)
            passed as `--train_data_dir`.
    """

    name: str
    flags: list[str] = field(default_factory=list)
    loss: tuple[str, str, str] = ("", "", "")
    backbone: str = "sd"
    slow: bool = False
    negative_prompts: bool = False
    images: bool = False

    @property
    def id(self) -> str:
        tags = [self.backbone] if self.backbone != "sd" else []
        tags += ["nasa-t"] if self.negative_prompts else []
        return f"{self.name}[{','.join(tags)}]" if tags else self.name

    @property
    def network(self) -> str:
        r"""The student network's folder in a saved full student (`unet` or `transformer`)."""
        return "transformer" if self.backbone == "pixart" else "unet"

    @property
    def pipeline_class(self):
        import diffusers_onestep

        name = {"sd": "OneStepPipeline", "sdxl": "OneStepXLPipeline", "pixart": "OneStepPixArtPipeline"}[self.backbone]
        return getattr(diffusers_onestep, name)

    @property
    def path(self) -> Path:
        return REPO / "training" / f"{self.name}.py"

    def argv(self, teacher: str, prompts: str, output_dir, *extra: str) -> list[str]:
        return [
            f"--pretrained_teacher_model_name_or_path={teacher}",
            f"--train_data_dir={tiny_imagefolder(prompts)}" if self.images else f"--train_prompts={prompts}",
            f"--output_dir={output_dir}",
            "--train_batch_size=2",
            "--seed=0",
            "--learning_rate=1e-3",
            "--report_to=none",
            "--mixed_precision=no",
            *self.flags,
            *([f"--negative_prompts={prompts}"] if self.negative_prompts else []),
            *extra,
        ]

    def loss_class(self):
        module, cls, _ = self.loss
        return getattr(importlib.import_module(module), cls)


_PGSB = {
    "flags": ["--fake_score_lora_rank=4", "--fake_score_lora_alpha=8"],
    "loss": ("diffusers_onestep.losses", "PGSwiftBrushLoss", "generator_loss"),
}
_SID = {"flags": ["--guidance_scale=2.0"], "loss": ("diffusers_onestep.losses", "SiDLoss", "generator_loss")}
_SCT = {
    "flags": ["--method=sct", "--stf_reference_size=2", "--dropout=0.1"],
    "loss": ("diffusers_onestep.losses", "ConsistencyTuningLoss", "__call__"),
    "images": True,
}
_ACT = {
    "flags": ["--train_batch_size=4", "--r1_interval=2", "--discriminator_block_out_channels=8,8", "--mid_weight=0.1"],
    "loss": ("diffusers_onestep.losses", "ACTLoss", "generator_loss"),
    "images": True,
}
SCRIPTS = [
    ScriptCase("train_pg_swiftbrush", **_PGSB),
    ScriptCase("train_pg_swiftbrush", **_PGSB, backbone="sdxl", slow=True),
    ScriptCase("train_pg_swiftbrush", **_PGSB, backbone="pixart", slow=True),
    # NASA-T: its fast checks (resume included) are tests/test_nasa_t.py
    ScriptCase("train_pg_swiftbrush", **_PGSB, negative_prompts=True, slow=True),
    # SiD: the paper's full fake-score copy (its LoRA mode: tests/test_train_sid.py)
    ScriptCase("train_sid", **_SID),
    ScriptCase("train_sid", **_SID, backbone="sdxl", slow=True),
    ScriptCase("train_sid", **_SID, backbone="pixart", slow=True),
    # ACT on an imagefolder: the student, its EMA target and the discriminator (plain CT: tests/test_train_act.py)
    ScriptCase("train_act", **_ACT),
    ScriptCase("train_act", **_ACT, backbone="sdxl", slow=True),
    ScriptCase("train_act", **_ACT, backbone="pixart", slow=True),
    # ECT / SCT on an imagefolder (ECT and the LoRA student: tests/test_train_sct.py)
    ScriptCase("train_sct", **_SCT),
    ScriptCase("train_sct", **_SCT, backbone="sdxl", slow=True),
    ScriptCase("train_sct", **_SCT, backbone="pixart", slow=True),
]


def tiny_imagefolder(prompts, size: int = 16) -> str:
    r"""
    An imagefolder next to the prompt file `prompts` (written once): two seeded random RGB images per prompt, the
    prompt as their caption (`text`) in `metadata.jsonl`. Returns its path.
    """
    import json

    import numpy as np
    from PIL import Image

    folder = f"{prompts}.images"
    if os.path.isfile(os.path.join(folder, "metadata.jsonl")):
        return folder
    os.makedirs(folder, exist_ok=True)
    captions = [line.strip() for line in open(prompts, encoding="utf-8") if line.strip()]
    rng, rows = np.random.default_rng(0), []
    for i, caption in enumerate(captions * 2):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i}.png"))
        rows.append({"file_name": f"{i}.png", "text": caption})
    with open(os.path.join(folder, "metadata.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return folder


def save_tiny_teacher(backbone: str, path) -> str:
    r"""Saves the tiny teacher of `backbone` as a real diffusers pipeline directory at `path`; returns the path."""
    from diffusers_onestep.testing_utils import get_dummy_pipeline

    pipe = get_dummy_pipeline(backbone)
    pipe.save_pretrained(path, safe_serialization=True)
    return str(path)


class TeacherDirs(dict):
    r"""Tiny teacher directories by backbone, saved on first use under `root` (`"sd"` may be given up front)."""

    def __init__(self, root, **given):
        super().__init__(given)
        self.root = root

    def __missing__(self, backbone: str) -> str:
        self[backbone] = save_tiny_teacher(backbone, os.path.join(str(self.root), backbone))
        return self[backbone]


def load_script(case: ScriptCase):
    r"""Imports `training/<name>.py` as a module (once per process)."""
    if case.name in sys.modules:
        return sys.modules[case.name]
    spec = importlib.util.spec_from_file_location(case.name, case.path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module
