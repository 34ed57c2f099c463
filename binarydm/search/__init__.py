"""Running a study: Optuna wiring, the ``--dry-run`` description and Pareto analysis.

``optuna_space`` and ``build_sampler`` give what ``OptunaSearch`` needs from a
``binarydm.spec.SearchSpec``; ``describe_space`` and ``estimate_cost`` are the
``--dry-run`` table and cost; ``pareto_front`` and ``hypervolume`` score the
finished trials. The driver (``run_study``) and the trial (``run_trial``,
``execute_trial``) are re-exported lazily: they import Ray and MLflow when they run.
What a study is, and how a study file is read, lives below in ``binarydm.spec``.
"""

from binarydm._lazy import by_module, lazy_exports
from binarydm.search._dry_run import CPU_COST, GPU_COST, CostModel, describe_space, estimate_cost
from binarydm.search._pareto import (
    default_reference_point,
    hypervolume,
    hypervolume_history,
    pareto_front,
)
from binarydm.search._sampling import (
    DefineByRunSpace,
    build_sampler,
    distribution,
    optuna_distributions,
    optuna_space,
    suggest,
)

# Loaded on first use: the driver and the trial import Ray and MLflow.
_LAZY = by_module(
    {
        "_driver": (
            "StudyError",
            "StudyInterrupted",
            "connect_ray",
            "run_single_trial",
            "run_study",
            "shared_teacher",
        ),
        "_trainable": ("StudyContext", "execute_trial", "run_trial"),
        "_analysis": ("pareto_table", "summarize"),
        "_early_stop": ("MOASHAScheduler", "rung_order", "survivors", "was_pruned"),
    }
)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

__all__ = [
    "CPU_COST",
    "GPU_COST",
    "CostModel",
    "DefineByRunSpace",
    "build_sampler",
    "default_reference_point",
    "describe_space",
    "distribution",
    "estimate_cost",
    "hypervolume",
    "hypervolume_history",
    "optuna_distributions",
    "optuna_space",
    "pareto_front",
    "suggest",
    *sorted(_LAZY),
]
