"""MLflow tracking of studies: a parent run per study, a child run per trial, read back alone.

Imports MLflow (and matplotlib/plotly for the plots, loaded on first use), never
Ray or Optuna, so the search layer and ``bdm-search pareto`` share it.
"""

from __future__ import annotations

from typing import Any

from binarydm.tracking._queries import oldest_run
from binarydm.tracking.buffer import BufferedLogger, is_tracking_outage
from binarydm.tracking.repro import reproducibility_params
from binarydm.tracking.results import (
    list_studies,
    load_reference,
    load_study_results,
    load_study_summary,
    plot_points,
)
from binarydm.tracking.runs import ParamConflictError, StudyTracker, flatten_params

__all__ = [
    "BufferedLogger",
    "ParamConflictError",
    "StudyTracker",
    "flatten_params",
    "is_tracking_outage",
    "list_studies",
    "load_reference",
    "load_study_results",
    "load_study_summary",
    "log_pareto_plots",
    "oldest_run",
    "pareto_plots",
    "plot_points",
    "reproducibility_params",
]

_PLOTS = ("pareto_plots", "log_pareto_plots")


def __getattr__(name: str) -> Any:
    # matplotlib and plotly take seconds to import; only the study's end needs them.
    if name in _PLOTS:
        from binarydm.tracking import plots

        return getattr(plots, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
