"""Study files: one YAML file describes one search, parsed into frozen, validated objects.

A study file holds the fixed ``settings`` of every trial (a ``TrialSettings``),
named ``profiles`` of dotted-key overrides (``quick`` for a CPU, ``gpu`` for real
results), the ``search`` (algorithm, objectives, budget, seeds, space) and where
results go (``resources``, ``tracking``, ``storage``). ``load_study`` reads and
checks all of it before Ray starts: every error is one ``ConfigError`` line naming
the file, the key, the bad value and what is allowed. docs/study-file.md is the
reference; search_spaces/study.schema.json is generated from these classes.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from binarydm._typed import ConfigError, require
from binarydm.spec._dimensions import CATEGORICAL, Dimension, expand_params
from binarydm.spec._early_stopping import EarlyStoppingSpec
from binarydm.spec._keys import (
    DATA_ROOT_ENV,
    METRIC_DIRECTIONS,
    Algorithm,
    Direction,
    Metric,
)
from binarydm.spec._uri import (
    absolute_path,
    absolute_store_uri,
    artifact_root,
    is_local_reference,
)
from binarydm.train.settings import TrialSettings

# Names become MLflow experiment, Optuna study and Ray results directory names.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _doc(text: str, **kwargs: Any) -> Any:
    """A dataclass field whose description the JSON Schema and the docs test read."""
    return field(metadata={"doc": text}, **kwargs)


@dataclass(frozen=True)
class Objective:
    """One optimised metric; ``direction`` defaults to the metric's natural one."""

    metric: Metric = _doc("a metric name of the trial contract (design.md)")
    direction: Direction | None = _doc(
        "minimize or maximize; null = the metric's natural direction", default=None
    )

    def __post_init__(self) -> None:
        require(
            self.metric in METRIC_DIRECTIONS,
            "metric",
            self.metric,
            "one of " + ", ".join(METRIC_DIRECTIONS),
        )
        if self.direction is None:
            object.__setattr__(self, "direction", METRIC_DIRECTIONS[self.metric])
        require(
            self.direction in ("minimize", "maximize"),
            "direction",
            self.direction,
            "'minimize' or 'maximize'",
        )

    @property
    def tune_mode(self) -> str:
        return "min" if self.direction == "minimize" else "max"


DEFAULT_OBJECTIVES = (Objective("fid"), Objective("ops_g"), Objective("size_mib"))


@dataclass(frozen=True, kw_only=True)
class SearchSpec:
    """What to search and how: algorithm, objectives, budget, seeds and the space."""

    space: dict[str, Dimension] = _doc("dotted settings key -> dimension (required, non-empty)")
    algorithm: Algorithm = _doc("Optuna sampler: NSGA-II, TPE, random or grid", default="nsga2")
    objectives: tuple[Objective, ...] = _doc(
        "metrics to optimise; default fid, ops_g, size_mib (all minimised)",
        default=DEFAULT_OBJECTIVES,
    )
    trials: int | None = _doc(
        "number of configurations; null only for grid (= the grid size)", default=None
    )
    seeds: tuple[int, ...] = _doc(
        "each configuration runs once per seed; objectives are the mean", default=(0,)
    )
    sampler_seed: int = _doc("seed of the Optuna sampler", default=0)
    reference_point: dict[str, float] | None = _doc(
        "hypervolume reference per metric; missing metrics = 1.1 x worst completed value",
        default=None,
    )
    population_size: int | None = _doc(
        "NSGA-II generation size; null = max(4, min(50, trials // 2))", default=None
    )
    startup_trials: int | None = _doc(
        "TPE random start-up trials; null = max(2, min(10, trials // 4))", default=None
    )
    fp_reference: bool = _doc(
        "score the FP teacher once with the trials' settings (the FP point, fid_ratio_to_fp);"
        " false only for smoke runs that need no FP point",
        default=True,
    )
    early_stopping: EarlyStoppingSpec = _doc(
        "stop trials dominated at a rung (MO-ASHA); off by default",
        default_factory=EarlyStoppingSpec,
    )

    def __post_init__(self) -> None:
        self._check_objectives()
        self.early_stopping.check_objectives(self.metrics)
        seeds = list(self.seeds)
        require(
            bool(seeds) and len(set(seeds)) == len(seeds),
            "search.seeds",
            seeds,
            "a non-empty list of distinct integers",
        )
        require(
            bool(self.space),
            "search.space",
            self.space,
            "a mapping of at least one dotted settings key to a dimension",
        )
        if self.algorithm == "grid":
            self._resolve_grid_trials()
        require(
            self.trials is not None,
            "search.trials",
            self.trials,
            f"an integer >= 1 (only grid derives it; algorithm is {self.algorithm})",
        )
        require(self.trials >= 1, "search.trials", self.trials, "an integer >= 1")
        if self.population_size is not None:
            require(
                self.population_size >= 2,
                "search.population_size",
                self.population_size,
                "an integer >= 2 (NSGA-II crossover needs two parents)",
            )
        elif self.algorithm == "nsga2":
            # Optuna's default of 50 would leave a 20-trial study in its random first
            # generation; two generations within the budget let selection act.
            object.__setattr__(self, "population_size", max(4, min(50, self.trials // 2)))
        if self.startup_trials is not None:
            require(
                self.startup_trials >= 1,
                "search.startup_trials",
                self.startup_trials,
                "an integer >= 1",
            )
        elif self.algorithm == "tpe":
            # Optuna's default of 10 random start-up trials would be a whole small study.
            object.__setattr__(self, "startup_trials", max(2, min(10, self.trials // 4)))

    def _check_objectives(self) -> None:
        require(
            len(self.objectives) >= 1,
            "search.objectives",
            list(self.objectives),
            "a non-empty list of {metric, direction}",
        )
        metrics = self.metrics
        for i, metric in enumerate(metrics):
            require(
                metric not in metrics[:i],
                f"search.objectives[{i}].metric",
                metric,
                "a metric not already listed",
            )
        if self.reference_point is None:
            return
        reference = {}
        for metric, value in self.reference_point.items():
            require(
                metric in metrics,
                f"search.reference_point.{metric}",
                value,
                "keys among the objectives: " + ", ".join(metrics),
            )
            require(
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and math.isfinite(value),
                f"search.reference_point.{metric}",
                value,
                "a finite number",
            )
            reference[metric] = float(value)
        object.__setattr__(self, "reference_point", reference)

    def _resolve_grid_trials(self) -> None:
        for key, dimension in self.space.items():
            require(
                dimension.kind in CATEGORICAL and not dimension.when,
                f"search.space.{key}",
                dimension.to_yaml(),
                "only {choice: [...]} or {cases: {...}} without when for algorithm grid "
                "(Optuna's GridSampler enumerates choices)",
            )
        size = self.grid_size
        if self.trials is None:
            object.__setattr__(self, "trials", size)
        require(
            self.trials <= size,
            "search.trials",
            self.trials,
            f"at most the grid size {size} (repeat configurations with search.seeds)",
        )

    @property
    def metrics(self) -> list[str]:
        return [o.metric for o in self.objectives]

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]

    @property
    def tune_modes(self) -> list[str]:
        """``mode`` for Ray Tune / OptunaSearch, one per metric."""
        return [o.tune_mode for o in self.objectives]

    @property
    def conditional(self) -> bool:
        return any(d.when for d in self.space.values())

    @property
    def grid_size(self) -> int | None:
        sizes = [d.size for d in self.space.values()]
        return None if None in sizes else math.prod(sizes)


@dataclass(frozen=True)
class ResourceSpec:
    """How many trials run at once, what each trial's driver reserves, how often it retries."""

    max_concurrent_trials: int | None = _doc(
        "null = as many as fit the cluster's CPUs/GPUs, capped by search.trials", default=None
    )
    cpus_per_trial: float = _doc(
        "CPUs reserved by each trial's driver, beside its Ray Train workers (workers.*); "
        "0 because the driver only waits on them",
        default=0.0,
    )
    trial_retries: int = _doc(
        "how often Ray Tune restarts a trial that raised (a new attempt of the same Optuna "
        "trial and MLflow run); a non-finite loss is never retried",
        default=0,
    )
    reuse_actors: bool = _doc(
        "run a trial in the actor process of a finished one (Ray Tune reuse_actors): a "
        "trial after the first wave skips the process start and imports of torch, "
        "diffusers and MLflow's store (6-17 s measured, benchmarks/results/gpu_perf.md)",
        default=True,
    )

    def __post_init__(self) -> None:
        require(
            self.trial_retries >= 0,
            "resources.trial_retries",
            self.trial_retries,
            "an integer >= 0",
        )
        if self.max_concurrent_trials is not None:
            require(
                self.max_concurrent_trials >= 1,
                "resources.max_concurrent_trials",
                self.max_concurrent_trials,
                "an integer >= 1 or null",
            )
        require(
            self.cpus_per_trial >= 0,
            "resources.cpus_per_trial",
            self.cpus_per_trial,
            "a number >= 0",
        )


@dataclass(frozen=True)
class TrackingSpec:
    """Where MLflow records the study (parent run) and its trials (child runs)."""

    uri: str | None = _doc("MLflow tracking URI; null = sqlite:///<cwd>/mlflow.db", default=None)
    experiment: str | None = _doc("MLflow experiment; null = the study name", default=None)
    artifact_location: str | None = _doc(
        "artifact root of a new experiment; null = <cwd>/mlartifacts", default=None
    )


@dataclass(frozen=True)
class StorageSpec:
    """Where the Optuna study and Ray Tune's experiment state live (resumable)."""

    optuna: str | None = _doc("Optuna storage URL; null = sqlite:///<cwd>/optuna.db", default=None)
    ray_results: str | None = _doc(
        "Ray Tune storage path or URI; null = <cwd>/ray_results", default=None
    )


_SECTIONS: dict[str, type] = {
    "search": SearchSpec,
    "resources": ResourceSpec,
    "tracking": TrackingSpec,
    "storage": StorageSpec,
}


@dataclass(frozen=True, kw_only=True)
class StudySpec:
    """One study file, validated, with the selected profile and overrides applied."""

    name: str = _doc("study name: letters, digits, '_', '.', '-'")
    settings: TrialSettings = _doc(
        "fixed settings of every trial (TrialSettings); defaults as there",
        default_factory=TrialSettings,
    )
    profiles: dict[str, dict[str, Any]] = _doc(
        "profile name -> {dotted key: value} overrides", default_factory=dict
    )
    default_profile: str | None = _doc(
        "profile applied when none is requested; ignored if there are no profiles",
        default="quick",
    )
    search: SearchSpec = _doc("the search (required)")
    resources: ResourceSpec = _doc("trial concurrency", default_factory=ResourceSpec)
    tracking: TrackingSpec = _doc("MLflow locations", default_factory=TrackingSpec)
    storage: StorageSpec = _doc("Optuna and Ray Tune state", default_factory=StorageSpec)
    # Not in the file: what loading decided.
    profile: str | None = field(default=None, metadata={"file": False})
    source: str | None = field(default=None, metadata={"file": False})
    #: (key, the file's settings value, the profile's) for each key the file's
    #: ``settings`` set that the selected profile replaced (``--set`` keys excepted).
    profile_replaced: tuple[tuple[str, Any, Any], ...] = field(default=(), metadata={"file": False})

    def profile_notes(self) -> list[str]:
        """The settings values the selected profile replaced (``profile_replaced``), in
        one line (none when it replaced nothing the file set)."""
        if not self.profile_replaced:
            return []
        changes = ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in self.profile_replaced)
        count = len(self.profile_replaced)
        values = "value" if count == 1 else "values"
        return [f"note: profile {self.profile!r} replaces {count} {values} of settings: {changes}"]

    def __post_init__(self) -> None:
        require(
            isinstance(self.name, str) and bool(_NAME.match(self.name)),
            "name",
            self.name,
            "letters, digits, '_', '.', '-' (it names the experiment and the Optuna study)",
        )
        self.search.early_stopping.check_fid_dims(self.settings.evaluation.fid_dims)

    def trial_settings(self, params: Mapping[str, Any], seed: int) -> TrialSettings:
        """The settings of one run: fixed settings (profile applied) + sampled ``params`` + seed."""
        unknown = sorted(set(params) - set(self.search.space))
        if unknown:
            raise ConfigError(
                f"{unknown[0]}={params[unknown[0]]!r} is invalid: not a dimension of study "
                f"{self.name}; allowed: {', '.join(self.search.space)}"
            )
        values = {key: _plain(value) for key, value in params.items()}
        return self.settings.replace(**expand_params(values, self.search.space), seed=_plain(seed))

    def max_concurrent_trials(self, cluster_cpus: float, cluster_gpus: float = 0) -> int:
        """``resources.max_concurrent_trials``, or how many trials fit the cluster at once."""
        trials = self.search.trials
        if self.resources.max_concurrent_trials is not None:
            return min(self.resources.max_concurrent_trials, trials)
        workers = self.settings.workers
        cpus = self.resources.cpus_per_trial + workers.num_workers * workers.cpus_per_worker
        fits = math.floor(cluster_cpus / cpus + 1e-9)
        if workers.use_gpu:
            gpus = workers.num_workers * workers.gpus_per_worker
            fits = min(fits, math.floor(cluster_gpus / gpus + 1e-9))
        return max(1, min(fits, trials))

    def resolve_paths(self, base_dir: str | os.PathLike[str] | None = None) -> StudySpec:
        """Defaults filled and every path absolute against ``base_dir`` (default: the cwd).

        Call it in the driver: Ray Tune runs each trial in its own working directory and
        ``ray job submit`` runs the driver in a temporary copy, so relative paths would
        point somewhere else in a trial. ``data.root`` falls back to $BINARYDM_DATA_ROOT.
        """
        base = Path(base_dir or Path.cwd()).resolve()
        uri = absolute_store_uri(self.tracking.uri, base, "mlflow.db")
        tracking = TrackingSpec(
            uri=uri,
            experiment=self.tracking.experiment or self.name,
            artifact_location=artifact_root(uri, self.tracking.artifact_location, base),
        )
        storage = StorageSpec(
            optuna=absolute_store_uri(self.storage.optuna, base, "optuna.db"),
            ray_results=absolute_path(self.storage.ray_results or "ray_results", base),
        )
        data, teacher = self.settings.data, self.settings.teacher
        paths: dict[str, Any] = {}
        root = data.root or os.environ.get(DATA_ROOT_ENV) or None
        if root is not None:
            paths["data.root"] = absolute_path(root, base)
        if data.path is not None:
            paths["data.path"] = absolute_path(data.path, base)
        if teacher.pretrained is not None and is_local_reference(teacher.pretrained, base):
            paths["teacher.pretrained"] = absolute_path(teacher.pretrained, base)
        settings = self.settings.replace(**paths) if paths else self.settings
        return dataclasses.replace(self, tracking=tracking, storage=storage, settings=settings)

    def to_dict(self) -> dict[str, Any]:
        """The study-file form (profile and overrides already applied to ``settings``)."""
        search = self.search
        settings = self.settings.to_dict()
        settings.pop("seed")  # each run's seed comes from search.seeds
        return {
            "name": self.name,
            "settings": settings,
            "profiles": copy.deepcopy(self.profiles),
            "default_profile": self.default_profile,
            "search": {
                "algorithm": search.algorithm,
                "objectives": [dataclasses.asdict(o) for o in search.objectives],
                "trials": search.trials,
                "seeds": list(search.seeds),
                "sampler_seed": search.sampler_seed,
                "reference_point": search.reference_point,
                "population_size": search.population_size,
                "startup_trials": search.startup_trials,
                "early_stopping": search.early_stopping.to_dict(),
                "space": {key: d.to_yaml() for key, d in search.space.items()},
            },
            "resources": dataclasses.asdict(self.resources),
            "tracking": dataclasses.asdict(self.tracking),
            "storage": dataclasses.asdict(self.storage),
        }


FILE_KEYS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(StudySpec) if f.metadata.get("file", True)
)


def override_keys() -> list[str]:
    """Study keys a profile or ``--set`` may override, beside dotted settings keys.

    ``search.space.<dotted key>`` replaces (or, with null, removes) one dimension.
    """
    keys = ["name"]
    for section, cls in _SECTIONS.items():
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(cls)]
    return keys


def _plain(value: Any) -> Any:
    """numpy scalars (from samplers) as Python ones, which the strict settings accept."""
    return value.item() if isinstance(value, np.generic) else value
