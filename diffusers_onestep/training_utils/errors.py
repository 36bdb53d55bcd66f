"""The errors a training run reports to its user in one line, and the entry point that prints them so."""

from __future__ import annotations

import sys
from collections.abc import Callable


__all__ = ["HubUploadError", "NonFiniteError", "TrainingArgumentError", "run_script"]


class TrainingArgumentError(ValueError):
    r"""A command-line value that is out of range, unknown, or points at something that cannot be used."""


class NonFiniteError(FloatingPointError):
    r"""A loss, gradient norm or weight became NaN or infinite (or, for weights, absurdly large)."""


class HubUploadError(RuntimeError):
    r"""The Hub upload failed after its retries; the message says where the model is saved and how to upload it."""


def run_script(main: Callable[[], object]) -> None:
    r"""
    Runs a training script's `main()`; the errors above end the process with their one-line message (exit status 1)
    instead of a traceback. Every other exception propagates unchanged (a bug keeps its traceback).
    """
    try:
        main()
    except (TrainingArgumentError, NonFiniteError, HubUploadError) as error:
        sys.exit(f"error: {error}")
