"""`OracleCalibration`: the oracle's score percentiles on the student's samples, which turn a percentile into `tau`.

Starodubcev et al. (CVPR 2024, Sec. 4) set the oracle threshold `tau` to the k-th percentile of the oracle's scores on
the student's own samples over a calibration prompt set, so that about k% of images like those go to the teacher.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.utils import logging


__all__ = ["CALIBRATION_NAME", "OracleCalibration", "check_percentile"]

logger = logging.get_logger(__name__)

CALIBRATION_NAME = "calibration.json"


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_percentile(percentile) -> None:
    r"""`percentile` must be a number in [0, 100]."""
    if not _is_real(percentile) or not 0 <= percentile <= 100:
        raise ValueError(f"`percentile` must be a number in [0, 100], got {percentile}.")


@dataclass(frozen=True)
class OracleCalibration:
    r"""
    The percentiles k = 0, 1, ..., 100 of an oracle's finite scores on the student's samples (`numpy.percentile`,
    linear interpolation), saved as `calibration.json` next to the pipeline.

    Args:
        percentiles (`list[float]`): the 101 percentiles, non-decreasing.
        num_samples (`int`): how many finite scores they summarise.
        oracle (`str`, *optional*): the class name of the oracle that gave the scores (thresholds mean something only
            for that oracle).
    """

    percentiles: list[float]
    num_samples: int
    oracle: str | None = None

    def __post_init__(self):
        values = self.percentiles
        if len(values) != 101 or not all(_is_real(v) and math.isfinite(v) for v in values):
            raise ValueError(f"`percentiles` must be 101 finite numbers (k = 0..100), got {len(values)} values.")
        if any(a > b for a, b in zip(values, values[1:])):
            raise ValueError("`percentiles` must be non-decreasing.")

    @classmethod
    def from_scores(cls, scores: torch.Tensor, *, oracle: str | None = None) -> OracleCalibration:
        r"""
        The calibration of `(num_samples,)` oracle scores. Non-finite scores are left out (with a warning); raises a
        `ValueError` when none is finite.
        """
        scores = torch.as_tensor(scores).flatten()
        finite = scores[torch.isfinite(scores)]
        if finite.numel() == 0:
            raise ValueError("The oracle returned no finite score on the calibration samples: cannot calibrate.")
        if finite.numel() < scores.numel():
            logger.warning(
                f"{scores.numel() - finite.numel()} non-finite oracle scores are left out of the calibration."
            )
        percentiles = np.percentile(finite.double().cpu().numpy(), np.arange(101))
        return cls(percentiles=[float(v) for v in percentiles], num_samples=int(finite.numel()), oracle=oracle)

    def threshold(self, percentile: float) -> float:
        r"""
        The threshold `tau` of `percentile` in [0, 100]: the stored percentiles, linearly interpolated between integer
        k; `-inf` for 0 (keep every image) and `+inf` for 100 (refine every image).
        """
        check_percentile(percentile)
        if percentile == 0:
            return -math.inf
        if percentile == 100:
            return math.inf
        return float(np.interp(percentile, np.arange(101), self.percentiles))

    def to_dict(self) -> dict:
        r"""The content of `calibration.json`: `{"percentiles": [...], "num_samples": n, "oracle": name}`."""
        return dataclasses.asdict(self)

    def __getitem__(self, key: str):
        r"""`calibration["percentiles"]`: reads like the `calibration.json` dict."""
        return self.to_dict()[key]

    def save(self, save_directory: str | os.PathLike) -> None:
        r"""Writes `calibration.json` into `save_directory`."""
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, CALIBRATION_NAME), "w", encoding="utf-8") as file:
            json.dump(self.to_dict(), file, indent=2)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> OracleCalibration | None:
        r"""Reads `directory/calibration.json`; `None` when there is none."""
        path = os.path.join(directory, CALIBRATION_NAME)
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as file:
            return cls(**json.load(file))

    def check_oracle(self, oracle) -> None:
        r"""Warns when `oracle` is not of the class the scores were calibrated with."""
        if oracle is not None and self.oracle not in (None, type(oracle).__name__):
            logger.warning(
                f"The percentiles were calibrated with a {self.oracle} oracle, but a {type(oracle).__name__} was "
                "given: percentile thresholds may not mean what they say."
            )
