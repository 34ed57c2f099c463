"""Running a study: Optuna wiring, the ``--dry-run`` description and Pareto analysis.

``optuna_space`` and ``build_sampler`` give what ``OptunaSearch`` needs from a
``binarydm.spec.SearchSpec``; ``describe_space`` and ``estimate_cost`` are the
``--dry-run`` table and cost; ``pareto_front`` and ``hypervolume`` score the
finished trials. The driver (``search.driver``) and the trial
(``search.trainable``) import Ray and MLflow when they run. What a study is, and
how a study file is read, lives below in ``binarydm.spec``.
"""

from binarydm.search._dry_run import CPU_COST, GPU_COST, CostModel, describe_space, estimate_cost
from binarydm.search._sampling import (
    DefineByRunSpace,
    build_sampler,
    distribution,
    optuna_distributions,
    optuna_space,
    suggest,
)
from binarydm.search.pareto import default_reference_point, hypervolume, pareto_front

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
    "optuna_distributions",
    "optuna_space",
    "pareto_front",
    "suggest",
]
