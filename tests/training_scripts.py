"""The training scripts under test, for the shared fault tests (kill / resume, NaN, Hub, token hygiene).

A new script is covered by `tests/test_training_faults.py` by adding one `ScriptCase` to `SCRIPTS`.
"""

import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path


__all__ = ["REPO", "SCRIPTS", "SUBPROCESS_ENV", "ScriptCase", "load_script"]

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
    """

    name: str
    flags: list[str] = field(default_factory=list)
    loss: tuple[str, str, str] = ("", "", "")

    @property
    def path(self) -> Path:
        return REPO / "training" / f"{self.name}.py"

    def argv(self, teacher: str, prompts: str, output_dir, *extra: str) -> list[str]:
        return [
            f"--pretrained_teacher_model_name_or_path={teacher}",
            f"--train_prompts={prompts}",
            f"--output_dir={output_dir}",
            "--train_batch_size=2",
            "--seed=0",
            "--learning_rate=1e-3",
            "--report_to=none",
            "--mixed_precision=no",
            *self.flags,
            *extra,
        ]

    def loss_class(self):
        module, cls, _ = self.loss
        return getattr(importlib.import_module(module), cls)


SCRIPTS = [
    ScriptCase(
        "train_pg_swiftbrush",
        flags=["--fake_score_lora_rank=4", "--fake_score_lora_alpha=8"],
        loss=("diffusers_onestep.losses", "PGSwiftBrushLoss", "generator_loss"),
    ),
]


def load_script(case: ScriptCase):
    r"""Imports `training/<name>.py` as a module (once per process)."""
    if case.name in sys.modules:
        return sys.modules[case.name]
    spec = importlib.util.spec_from_file_location(case.name, case.path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module
