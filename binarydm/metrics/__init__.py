"""Quality and cost metrics: FID (pytorch-fid's Inception), precision/recall, OPs/BOPs, size.

Imports torch (and numpy/scipy/pytorch-fid for FID) only. FID names are loaded lazily:
importing pytorch-fid costs seconds that the cost report alone does not need.
"""

from __future__ import annotations

from typing import Any

from binarydm.metrics.efficiency import EfficiencyReport, LayerEfficiency, efficiency_report
from binarydm.metrics.precision_recall import improved_precision_recall, knn_radii

__all__ = [
    "FIDScorer",
    "EfficiencyReport",
    "LayerEfficiency",
    "efficiency_report",
    "frechet_distance",
    "improved_precision_recall",
    "knn_radii",
    "reference_features",
    "reference_statistics",
    "reference_statistics_and_features",
]

_FID = (
    "FIDScorer",
    "frechet_distance",
    "reference_features",
    "reference_statistics",
    "reference_statistics_and_features",
)


def __getattr__(name: str) -> Any:
    if name in _FID:
        from binarydm.metrics import fid

        return getattr(fid, name)
    raise AttributeError(name)
