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
import difflib
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from binarydm._typed import ConfigError, build, require
from binarydm.search.space import (
    CATEGORICAL,
    Dimension,
    check_values,
    expand_params,
    invalid_combinations,
    parse_space,
)
from binarydm.train.settings import TrialSettings

Algorithm = Literal["nsga2", "tpe", "random", "grid"]
Direction = Literal["minimize", "maximize"]

#: The direction in which each metric of design.md's contract improves: an objective's default.
METRIC_DIRECTIONS: dict[str, Direction] = {
    "fid": "minimize",
    "precision": "maximize",
    "recall": "maximize",
    "ops_g": "minimize",
    "bops_g": "minimize",
    "flops_g": "minimize",
    "size_mib": "minimize",
    "weight_bits": "minimize",
    "test_loss": "minimize",
    "ops_saving": "maximize",
    "size_saving": "maximize",
    "loss": "minimize",
    "loss_lrm": "minimize",
    "loss_ebb": "minimize",
    "train_s": "minimize",
    "eval_s": "minimize",
    "train_images_per_s": "maximize",
    "sample_images_per_s": "maximize",
}
# Built from the table so the two cannot disagree; the JSON Schema's enum comes from it.
Metric = Literal[tuple(METRIC_DIRECTIONS)]  # type: ignore[valid-type]
DATA_ROOT_ENV = "BINARYDM_DATA_ROOT"
#: ``--profile none`` applies no profile, so no profile may be called that.
NO_PROFILE = "none"
# Names become MLflow experiment, Optuna study and Ray results directory names.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_COMBINATION_SAMPLES = 32
_SPACE_KEY = re.compile(r"^search\.space\..+$")
#: Dotted ``TrialSettings`` keys a study may fix, override or search. Not ``seed``: each
#: run's seed comes from ``search.seeds``, so a fixed one would be silently ignored.
SETTINGS_KEYS: tuple[str, ...] = tuple(k for k in TrialSettings().flat() if k != "seed")
# workers.inline is set, not searched: a trial's resources are reserved before its
# parameters are sampled, and inline decides what the trial itself reserves.
UNSEARCHABLE = {"workers.inline": "not searchable (it decides what every trial reserves)"}
SEARCHABLE_KEYS: tuple[str, ...] = tuple(k for k in SETTINGS_KEYS if k not in UNSEARCHABLE)
_SEED_ALLOWED = "not set here: each run's seed comes from search.seeds"


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

    def __post_init__(self) -> None:
        self._check_objectives()
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

    def __post_init__(self) -> None:
        require(
            isinstance(self.name, str) and bool(_NAME.match(self.name)),
            "name",
            self.name,
            "letters, digits, '_', '.', '-' (it names the experiment and the Optuna study)",
        )

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
        uri = _absolute_uri(self.tracking.uri, base, "mlflow.db")
        artifacts = self.tracking.artifact_location
        if artifacts is None and uri.startswith(("http://", "https://", "databricks")):
            # A tracking server proxies artifacts to its own store: a local folder on the
            # driver would be unreachable from trials on other nodes.
            location = None
        else:
            location = _absolute_path(artifacts or "mlartifacts", base)
        tracking = TrackingSpec(
            uri=uri,
            experiment=self.tracking.experiment or self.name,
            artifact_location=location,
        )
        storage = StorageSpec(
            optuna=_absolute_uri(self.storage.optuna, base, "optuna.db"),
            ray_results=_absolute_path(self.storage.ray_results or "ray_results", base),
        )
        data, teacher = self.settings.data, self.settings.teacher
        paths: dict[str, Any] = {}
        root = data.root or os.environ.get(DATA_ROOT_ENV) or None
        if root is not None:
            paths["data.root"] = _absolute_path(root, base)
        if data.path is not None:
            paths["data.path"] = _absolute_path(data.path, base)
        if teacher.pretrained is not None and _is_local(teacher.pretrained, base):
            paths["teacher.pretrained"] = _absolute_path(teacher.pretrained, base)
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


# -- reading ---------------------------------------------------------------------------


class _StudyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, plus YAML 1.2 floats and an error on duplicate keys.

    PyYAML follows YAML 1.1, where ``1e-4`` (no dot) is a string; study files are
    full of such learning rates. Duplicate keys are an error in YAML, but PyYAML
    silently keeps the last, which would hide a repeated search dimension.
    """


_StudyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _construct_mapping(loader: _StudyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, value_node in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key in seen:
            value = loader.construct_object(value_node, deep=True)
            raise ConfigError(
                f"{key}={value!r} on line {line} is invalid: duplicate key (first on line "
                f"{seen[key]}); allowed: each key once"
            )
        seen[key] = line
    return loader.construct_mapping(node, deep=True)


_StudyLoader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)


def _read_yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_StudyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"YAML syntax error{where}: {problem}") from None


def parse_value(text: str) -> Any:
    """A command-line value read as YAML, as in a study file: ``1e-4``, ``true``, ``[1, 2]``."""
    return _read_yaml(text)


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"training.steps=200"`` -> ``("training.steps", 200)`` (the ``--set`` syntax)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r} is invalid: allowed KEY=VALUE, e.g. training.steps=200")
    try:
        return key.strip(), parse_value(value)
    except ConfigError as exc:
        raise ConfigError(f"--set {text!r} is invalid: {exc}") from None


def load_study(
    path: str | os.PathLike[str],
    *,
    profile: str | None = None,
    overrides: Mapping[str, Any] | Iterable[str] | None = None,
) -> StudySpec:
    """Read and validate a study file.

    ``profile``: a profile name, ``"none"`` for none, or None for ``default_profile``.
    ``overrides``: ``--set`` assignments, as ``"key=value"`` strings or a mapping whose
    string values are read as YAML; keys are dotted settings keys or study keys
    (``search.trials``, ``search.space.training.lr``...). They win over the profile.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        studies = sorted(p.name for p in path.parent.glob("*.yaml")) if path.parent.is_dir() else []
        hint = f"allowed: {', '.join(studies)}" if studies else "allowed: an existing YAML file"
        raise ConfigError(f"{path}: no such study file; {hint}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the study file: {exc.strerror}") from None
    try:
        data = _read_yaml(text)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return parse_study(data, source=str(path), profile=profile, overrides=overrides)


def parse_study(
    data: Any,
    *,
    source: str = "<study>",
    profile: str | None = None,
    overrides: Mapping[str, Any] | Iterable[str] | None = None,
) -> StudySpec:
    """Validate an already-read study mapping; see ``load_study``.

    The file must be valid without a profile, and every profile is checked, not only
    the selected one, so a broken ``gpu`` profile fails on a laptop too.
    """
    try:
        if not isinstance(data, dict):
            raise ConfigError(f"{data!r} is invalid: allowed a mapping with {', '.join(FILE_KEYS)}")
        unknown = sorted(set(data) - set(FILE_KEYS))
        if unknown:
            raise ConfigError(
                f"{unknown[0]}={data[unknown[0]]!r} is invalid: unknown key; "
                f"allowed: {', '.join(FILE_KEYS)}"
            )
        profiles = _parse_profiles(data.get("profiles"))
        default = data.get("default_profile", "quick")
        require(
            default is None or isinstance(default, str),
            "default_profile",
            default,
            "a profile name or null",
        )
        if profiles and default is not None:
            require(
                default in profiles,
                "default_profile",
                default,
                "one of " + ", ".join(profiles) + " or null",
            )
        selected = profile if profile is not None else (default if profiles else None)
        if selected == NO_PROFILE:
            selected = None
        elif selected is not None:
            require(
                selected in profiles,
                "profile",
                selected,
                "one of " + ", ".join([*profiles, NO_PROFILE]),
            )
        cli = _as_overrides(overrides)
        _in_context("", lambda: _assemble(data, profiles, None, {}))
        for name in profiles:
            if name != selected or cli:
                _in_context(f"profile {name!r}: ", lambda n=name: _assemble(data, profiles, n, {}))
        context = "--set: " if cli else (f"profile {selected!r}: " if selected else "")
        spec = _in_context(context, lambda: _assemble(data, profiles, selected, cli))
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return dataclasses.replace(spec, source=source)


def _in_context(context: str, thunk: Callable[[], Any]) -> Any:
    """Run ``thunk``, prefixing any ConfigError with where it happened (a profile, --set)."""
    try:
        return thunk()
    except ConfigError as exc:
        raise ConfigError(f"{context}{exc}") from None


def _parse_profiles(raw: Any) -> dict[str, dict[str, Any]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"profiles={raw!r} is invalid: allowed a mapping of name -> overrides")
    profiles = {}
    for name, overrides in raw.items():
        require(
            isinstance(name, str) and name != NO_PROFILE,
            "profiles",
            name,
            f"string names other than {NO_PROFILE!r}",
        )
        require(
            isinstance(overrides, dict),
            f"profiles.{name}",
            overrides,
            "a mapping of dotted key -> value",
        )
        _in_context(f"profile {name!r}: ", lambda o=overrides: _split_overrides(o))
        profiles[name] = dict(overrides)
    return profiles


def _as_overrides(overrides: Mapping[str, Any] | Iterable[str] | None) -> dict[str, Any]:
    if overrides is None:
        return {}
    if isinstance(overrides, str):  # one assignment, not an iterable of characters
        overrides = [overrides]
    if isinstance(overrides, Mapping):
        parsed = {}
        for key, value in overrides.items():
            parsed[key] = parse_assignment(f"{key}={value}")[1] if isinstance(value, str) else value
        return parsed
    return dict(parse_assignment(text) for text in overrides)


def _split_overrides(overrides: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Separate dotted settings keys from study keys, rejecting anything else."""
    settings, study = {}, {}
    allowed_study = override_keys()
    for key, value in overrides.items():
        require(key != "seed", "seed", value, _SEED_ALLOWED)
        if key in SETTINGS_KEYS:
            settings[key] = value
        elif key in allowed_study or (isinstance(key, str) and _SPACE_KEY.match(key)):
            study[key] = value
        else:
            close = difflib.get_close_matches(str(key), [*SETTINGS_KEYS, *allowed_study], n=1)
            hint = f"did you mean {close[0]}?" if close else "see docs/study-file.md"
            raise ConfigError(
                f"{key}={value!r} is invalid: unknown key; allowed: a dotted "
                f"settings key or a study key ({hint})"
            )
    return settings, study


def _section(raw: dict[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name)
    if value is None:
        return {}
    require(isinstance(value, dict), name, value, "a mapping")
    return value


def _apply_study_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> None:
    for key, value in overrides.items():
        if key == "name":
            raw["name"] = value
            continue
        section_name, _, rest = key.partition(".")
        section = raw[section_name] = dict(_section(raw, section_name))
        if rest.startswith("space."):
            space = section["space"] = dict(_section(section, "space"))
            if value is None:
                space.pop(rest[len("space.") :], None)
            else:
                space[rest[len("space.") :]] = value
        else:
            section[rest] = value


def _assemble(
    data: dict[str, Any],
    profiles: dict[str, dict[str, Any]],
    profile: str | None,
    cli: dict[str, Any],
) -> StudySpec:
    """Build the study with ``profile`` and then ``cli`` overrides applied."""
    fixed = _section(data, "settings")
    require("seed" not in fixed, "settings.seed", fixed.get("seed"), _SEED_ALLOWED)
    base = _in_context("settings: ", lambda: TrialSettings.from_dict(fixed))
    profile_settings, profile_study = _split_overrides(profiles.get(profile, {}))
    cli_settings, cli_study = _split_overrides(cli)
    settings = base.replace(**{**profile_settings, **cli_settings})
    raw = copy.deepcopy(data)
    _apply_study_overrides(raw, {**profile_study, **cli_study})
    search_raw = dict(_section(raw, "search"))
    require(
        "space" in search_raw,
        "search.space",
        None,
        "a mapping of at least one dotted settings key to a dimension",
    )
    space = parse_space(search_raw.pop("space"))
    _check_space_keys(space)
    check_values(settings, space)
    failures = invalid_combinations(settings, space, limit=_COMBINATION_SAMPLES)
    if failures:
        params, reason = failures[0]
        raise ConfigError(
            f"search.space: the combination {params} is invalid ({reason}); allowed: "
            "combinations the settings accept: add a when: condition"
        )
    return StudySpec(
        name=raw.get("name"),
        settings=settings,
        profiles=profiles,
        default_profile=data.get("default_profile", "quick"),
        search=build(SearchSpec, {**search_raw, "space": space}, "search."),
        resources=build(ResourceSpec, _section(raw, "resources"), "resources."),
        tracking=build(TrackingSpec, _section(raw, "tracking"), "tracking."),
        storage=build(StorageSpec, _section(raw, "storage"), "storage."),
        profile=profile,
    )


def _check_space_keys(space: dict[str, Dimension]) -> None:
    for key, dimension in space.items():
        if dimension.kind == "cases":
            _check_case_keys(dimension, space)
            continue
        if key in SEARCHABLE_KEYS:
            continue
        reason = "unknown key"
        if key in UNSEARCHABLE:
            reason = UNSEARCHABLE[key]
            allowed = "a fixed value under settings (or --set)"
        elif key == "seed":
            allowed = "a settings key other than seed (seeds are search.seeds)"
        else:
            close = difflib.get_close_matches(key, SETTINGS_KEYS, n=1)
            hint = f"did you mean {close[0]}?" if close else "see docs/study-file.md"
            allowed = f"a dotted settings key ({hint})"
        raise ConfigError(
            f"search.space.{key}={dimension.to_yaml()!r} is invalid: {reason}; allowed: {allowed}"
        )


def _check_case_keys(dimension: Dimension, space: dict[str, Dimension]) -> None:
    """Every key a case sets is a searchable settings key that no other dimension sets."""
    others = {
        name
        for other in space.values()
        if other is not dimension
        for name in (
            [k for case in other.cases.values() for k in case]
            if other.kind == "cases"
            else [other.key]
        )
    }
    for case, settings in dimension.cases.items():
        for key, value in settings.items():
            where = f"search.space.{dimension.key}.cases.{case}.{key}"
            if key not in SEARCHABLE_KEYS:
                close = difflib.get_close_matches(str(key), SEARCHABLE_KEYS, n=1)
                hint = f"did you mean {close[0]}?" if close else "see docs/study-file.md"
                raise ConfigError(
                    f"{where}={value!r} is invalid: not a searchable settings key; allowed: "
                    f"a dotted settings key ({hint})"
                )
            require(
                key not in others,
                where,
                value,
                "a key no other dimension of the space sets (two dimensions would both set it)",
            )


# -- paths -------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """numpy scalars (from samplers) as Python ones, which the strict settings accept."""
    return value.item() if isinstance(value, np.generic) else value


def _is_uri(text: str) -> bool:
    # "scheme://..." and MLflow's "mlflow-artifacts:/path" form; not "C:/..." style paths.
    head, sep, _ = text.partition(":")
    return "://" in text or (bool(sep) and len(head) > 1 and "/" not in head)


def _absolute_path(path: str, base: Path) -> str:
    if _is_uri(path):
        return path
    return str((base / Path(path).expanduser()).resolve())


def _absolute_uri(uri: str | None, base: Path, default_file: str) -> str:
    """A database URI with a relative SQLite file made absolute; other URIs unchanged."""
    if uri is None:
        return f"sqlite:///{base / default_file}"
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :]
        if path and path != ":memory:" and not Path(path).is_absolute():
            return f"sqlite:///{(base / path).resolve()}"
        return uri
    return uri if _is_uri(uri) else _absolute_path(uri, base)


def _is_local(reference: str, base: Path) -> bool:
    """A pretrained-model reference that names a local folder rather than a hub id."""
    return reference.startswith((".", "/", "~")) or (base / reference).exists()
