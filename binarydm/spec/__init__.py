"""Describing a study: the study-file types, loading, profiles and overrides, dimensions.

``load_study`` turns a YAML study file into a validated, frozen ``StudySpec``
(``parse_study`` does the same for an already-read mapping); ``parse_space`` and
``Dimension`` are its search space; ``binarydm.spec.schema`` generates the file's
JSON Schema from the same classes. This package only describes: it imports
neither Ray, Optuna nor MLflow. ``binarydm.search`` runs what it describes.
"""

from binarydm.spec._combinations import check_values, invalid_combinations
from binarydm.spec._dimensions import (
    CATEGORICAL,
    DIMENSION_FORMS,
    Dimension,
    expand_params,
    parse_dimension,
    parse_space,
)
from binarydm.spec._early_stopping import EarlyStoppingSpec, cost_objectives
from binarydm.spec._keys import (
    DATA_ROOT_ENV,
    METRIC_DIRECTIONS,
    NO_PROFILE,
    SEARCHABLE_KEYS,
    SETTINGS_KEYS,
    UNSEARCHABLE,
)
from binarydm.spec._loading import load_study, parse_assignment, parse_study, parse_value
from binarydm.spec._types import (
    FILE_KEYS,
    Objective,
    ResourceSpec,
    SearchSpec,
    StorageSpec,
    StudySpec,
    TrackingSpec,
    override_keys,
)
from binarydm.spec._uri import (
    absolute_path,
    absolute_store_uri,
    artifact_root,
    is_remote_uri,
    is_uri,
    sqlite_file,
    uri_scheme,
)

__all__ = [
    "CATEGORICAL",
    "DATA_ROOT_ENV",
    "DIMENSION_FORMS",
    "FILE_KEYS",
    "METRIC_DIRECTIONS",
    "NO_PROFILE",
    "SEARCHABLE_KEYS",
    "SETTINGS_KEYS",
    "UNSEARCHABLE",
    "Dimension",
    "EarlyStoppingSpec",
    "Objective",
    "ResourceSpec",
    "SearchSpec",
    "StorageSpec",
    "StudySpec",
    "TrackingSpec",
    "absolute_path",
    "absolute_store_uri",
    "artifact_root",
    "check_values",
    "cost_objectives",
    "expand_params",
    "invalid_combinations",
    "is_remote_uri",
    "is_uri",
    "load_study",
    "override_keys",
    "parse_assignment",
    "parse_dimension",
    "parse_space",
    "parse_study",
    "parse_value",
    "sqlite_file",
    "uri_scheme",
]
