"""Study files, their search spaces and Pareto analysis.

``load_study`` turns a YAML study file into a validated ``StudySpec``;
``optuna_space`` and ``build_sampler`` give what ``OptunaSearch`` needs;
``pareto_front`` and ``hypervolume`` score the finished trials. Nothing here
imports Ray or MLflow, and Optuna only inside the functions that need it.
"""

from binarydm.search.pareto import default_reference_point, hypervolume, pareto_front
from binarydm.search.space import (
    CPU_COST,
    GPU_COST,
    CostModel,
    DefineByRunSpace,
    Dimension,
    build_sampler,
    describe_space,
    estimate_cost,
    invalid_combinations,
    optuna_distributions,
    optuna_space,
    parse_dimension,
)
from binarydm.search.study import (
    METRIC_DIRECTIONS,
    Objective,
    ResourceSpec,
    SearchSpec,
    StorageSpec,
    StudySpec,
    TrackingSpec,
    load_study,
    parse_assignment,
    parse_study,
)

__all__ = [
    "CPU_COST",
    "GPU_COST",
    "METRIC_DIRECTIONS",
    "CostModel",
    "DefineByRunSpace",
    "Dimension",
    "Objective",
    "ResourceSpec",
    "SearchSpec",
    "StorageSpec",
    "StudySpec",
    "TrackingSpec",
    "build_sampler",
    "default_reference_point",
    "describe_space",
    "estimate_cost",
    "hypervolume",
    "invalid_combinations",
    "load_study",
    "optuna_distributions",
    "optuna_space",
    "parse_assignment",
    "parse_dimension",
    "parse_study",
    "pareto_front",
]
