"""Metrics usable from scripts and benchmarks: FID from features, prompt accuracy, precision / recall, removal rate."""

from .metrics import (
    feature_statistics,
    fid_from_features,
    frechet_distance,
    precision_recall,
    prompt_accuracy,
    removal_rate,
)


__all__ = [
    "feature_statistics",
    "fid_from_features",
    "frechet_distance",
    "precision_recall",
    "prompt_accuracy",
    "removal_rate",
]
