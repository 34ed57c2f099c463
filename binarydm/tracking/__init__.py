"""MLflow tracking of studies: a parent run per study, a child run per trial, read back alone.

Imports MLflow (and matplotlib for the plots, loaded on first use), never
Ray, and Optuna only where a run archive carries a study's trials (on use), so the
search layer and ``bdm-search pareto`` share it.
"""

from __future__ import annotations

from binarydm._lazy import by_module, lazy_exports
from binarydm.tracking._buffer import BufferedLogger, is_tracking_outage
from binarydm.tracking._queries import oldest_run
from binarydm.tracking._repro import reproducibility_params
from binarydm.tracking._results import (
    find_run,
    list_studies,
    load_reference,
    load_study_results,
    load_study_summary,
    plot_points,
)
from binarydm.tracking._runs import (
    TAG_ERROR,
    TAG_REFERENCE_KEY,
    TAG_REUSED_FROM,
    TAG_SEARCHED,
    ParamConflictError,
    StudyTracker,
    flatten_params,
    truncate,
)
from binarydm.tracking._study_journal import MLFLOW_RUN_ATTR

__all__ = [
    "MLFLOW_RUN_ATTR",
    "TAG_ERROR",
    "TAG_REFERENCE_KEY",
    "TAG_REUSED_FROM",
    "TAG_SEARCHED",
    "truncate",
    "BufferedLogger",
    "ParamConflictError",
    "StudyTracker",
    "find_run",
    "flatten_params",
    "hypervolume_figure",
    "log_hypervolume_history",
    "log_summary_table",
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
    "export_experiment",
    "import_archive",
    "read_archive",
]

# matplotlib takes seconds to import; only the study's end needs the plots.
_LAZY = by_module(
    {
        "_plots": ("pareto_plots", "log_pareto_plots"),
        "_hypervolume_plot": ("hypervolume_figure", "log_hypervolume_history"),
        "_summary_table": ("log_summary_table",),
        "_archive": ("export_experiment", "import_archive", "read_archive"),
    }
)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
