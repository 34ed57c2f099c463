"""Quality and cost metrics: FID (pytorch-fid's Inception), OPs/BOPs and model size.

Imports torch (and numpy/scipy/pytorch-fid for FID) only. FID names are loaded lazily:
importing pytorch-fid costs seconds that the cost report alone does not need.
"""

from __future__ import annotations

from typing import Any

from binarydm.metrics.efficiency import EfficiencyReport, LayerEfficiency, efficiency_report

__all__ = [
    "FIDScorer",
    "EfficiencyReport",
    "LayerEfficiency",
    "efficiency_report",
    "frechet_distance",
    "reference_statistics",
]

_FID = ("FIDScorer", "frechet_distance", "reference_statistics")


def __getattr__(name: str) -> Any:
    if name in _FID:
        from binarydm.metrics import fid

        return getattr(fid, name)
    raise AttributeError(name)
