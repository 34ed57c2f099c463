"""Search dimensions of a study file and their Optuna form.

In a study file a dimension is one tagged mapping under ``search.space``::

    method.lrm.rank_divisor: {choice: [1, 2, 4, 8, 16]}
    training.steps: {int: [100, 300], step: 50}
    training.lr: {float: [1.0e-5, 1.0e-3], log: true}
    method.lrm.weight: {logfloat: [1.0e-6, 1.0]}
    method.ebb.tau: {logfloat: [9.0e-4, 9.0e-2], when: {method.ebb.enabled: true}}

``when`` makes a dimension conditional on earlier choice dimensions: it is sampled
only if each named dimension was sampled with one of the listed values, otherwise
the setting keeps its fixed value. That keeps knobs that only mean something
together (EBB needs two bases) from producing trials that cannot be built.

A ``cases`` dimension names whole configurations, for ablations whose rows are not
a product of choices; its key is a label (no dots), each case a bundle of dotted
settings that the trial applies together::

    row:
      cases:
        baseline: {method.weight.bases: 1, method.ebb.enabled: false}
        ebb: {method.ebb.enabled: true, method.lrm.enabled: false}

Optuna sees it as a categorical over the case names (``expand_params`` turns the
sampled name back into its settings).

This module turns dimensions into ``optuna.distributions`` for
``ray.tune.search.optuna.OptunaSearch``, builds the sampler of each algorithm,
and describes a study for ``--dry-run`` (space table, combination check, cost
estimate). Optuna is imported inside the functions that need it.
"""

from __future__ import annotations

import itertools
import math
import os
import random
import statistics
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from binarydm._typed import ConfigError

if TYPE_CHECKING:
    import optuna
    from rich.table import Table

    from binarydm.search.study import SearchSpec, StudySpec
    from binarydm.train.settings import TrialSettings

DimensionKind = Literal["choice", "int", "float", "cases"]

#: The YAML tags of a dimension and the options each accepts; the parser and the
#: JSON Schema are both generated from this table.
DIMENSION_FORMS: dict[str, tuple[str, ...]] = {
    "choice": ("when",),
    "int": ("step", "log", "when"),
    "float": ("log", "when"),
    "logfloat": ("when",),
    "cases": ("when",),
}
_FORMS_TEXT = (
    "{choice: [..]}, {int: [low, high]}, {float: [low, high]}, {logfloat: [low, high]}, "
    "{cases: {name: {dotted key: value}}}"
)
#: Dimension kinds sampled from a finite list of values (grid-able, usable in ``when``).
CATEGORICAL = ("choice", "cases")
# Optuna's CategoricalDistribution stores only these types (and they survive its storages).
_SCALARS = (type(None), bool, int, float, str)


def _same(a: Any, b: Any) -> bool:
    """Equality that keeps ``True`` apart from ``1`` (Python's ``True == 1`` would merge them)."""
    return type(a) is type(b) and a == b


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class Dimension:
    """One searched setting: a dotted ``TrialSettings`` key and the values it may take."""

    key: str
    kind: DimensionKind
    choices: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None
    step: int = 1
    log: bool = False
    when: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    #: ``kind == "cases"``: case name -> the dotted settings it sets (names = ``choices``).
    cases: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"search.space.{self.key}"
        if self.kind == "cases":
            self._check_cases(where)
        elif self.kind == "choice":
            self._check_choices(where)
        elif self.kind in ("int", "float"):
            self._check_range(where)
        else:
            raise ConfigError(f"{where}: kind={self.kind!r} is invalid: allowed {_FORMS_TEXT}")
        for name, allowed in self.when.items():
            if not isinstance(allowed, tuple) or not allowed:
                raise ConfigError(
                    f"{where}.when.{name}={allowed!r} is invalid: "
                    "allowed a value or a list of values"
                )

    def _check_choices(self, where: str) -> None:
        if not self.choices:
            raise ConfigError(
                f"{where}.choice={list(self.choices)!r} is invalid: allowed a non-empty list"
            )
        for value in self.choices:
            if not isinstance(value, _SCALARS):
                raise ConfigError(
                    f"{where}.choice: {value!r} is invalid: "
                    "allowed null, booleans, numbers, strings"
                )
        for i, value in enumerate(self.choices):
            if any(_same(value, other) for other in self.choices[:i]):
                raise ConfigError(f"{where}.choice: {value!r} is invalid: listed twice")

    def _check_cases(self, where: str) -> None:
        if "." in self.key:
            raise ConfigError(
                f"{where}: a cases dimension is invalid under a dotted key: allowed a label "
                "without dots (each case sets dotted keys itself)"
            )
        if not self.cases:
            raise ConfigError(
                f"{where}.cases={self.cases!r} is invalid: allowed a non-empty mapping"
            )
        for name, settings in self.cases.items():
            if not isinstance(name, str) or not name:
                raise ConfigError(f"{where}.cases: {name!r} is invalid: allowed string names")
            if not isinstance(settings, dict) or not settings:
                raise ConfigError(
                    f"{where}.cases.{name}={settings!r} is invalid: allowed a non-empty mapping "
                    "of dotted settings keys to values"
                )
        object.__setattr__(self, "choices", tuple(self.cases))

    def _check_range(self, where: str) -> None:
        tag = "logfloat" if self.kind == "float" and self.log else self.kind
        bounds = [self.low, self.high]
        number = (
            (lambda v: isinstance(v, int) and not isinstance(v, bool))
            if self.kind == "int"
            else _is_number
        )
        if not all(number(b) for b in bounds) or not self.low < self.high:
            kind = "integers" if self.kind == "int" else "numbers"
            raise ConfigError(
                f"{where}.{tag}={bounds!r} is invalid: allowed [low, high], {kind} with low < high"
            )
        if self.log and self.low <= 0:
            raise ConfigError(
                f"{where}.{tag}={bounds!r} is invalid: allowed low > 0 on a log scale"
            )
        if self.kind != "int":
            return
        if not isinstance(self.step, int) or isinstance(self.step, bool) or self.step < 1:
            raise ConfigError(f"{where}.step={self.step!r} is invalid: allowed an integer >= 1")
        if self.log and self.step != 1:
            raise ConfigError(
                f"{where}.step={self.step!r} is invalid: allowed only 1 with log: true"
            )
        if (self.high - self.low) % self.step:
            raise ConfigError(
                f"{where}.int={bounds!r} is invalid: "
                f"allowed high - low a multiple of step={self.step}"
            )

    @property
    def size(self) -> int | None:
        """Number of values of a choice or cases dimension; None for ranges."""
        return len(self.choices) if self.kind in CATEGORICAL else None

    def candidates(self) -> tuple[Any, ...]:
        """The values that bound this dimension: every choice (case name), or both ends
        of a range."""
        return self.choices if self.kind in CATEGORICAL else (self.low, self.high)

    def settings_of(self, value: Any) -> dict[str, Any]:
        """The dotted settings a sampled ``value`` sets: its case's, or ``{key: value}``."""
        if self.kind == "cases":
            return dict(self.cases[value])
        return {self.key: value}

    def active(self, params: dict[str, Any]) -> bool:
        """Whether this dimension is sampled given the parameters sampled before it."""
        return all(
            name in params and any(_same(params[name], v) for v in allowed)
            for name, allowed in self.when.items()
        )

    def to_yaml(self) -> dict[str, Any]:
        """The study-file form; ``parse_dimension(key, dim.to_yaml()) == dim``."""
        if self.kind == "cases":
            form: dict[str, Any] = {"cases": {k: dict(v) for k, v in self.cases.items()}}
        elif self.kind == "choice":
            form = {"choice": list(self.choices)}
        elif self.kind == "int":
            form = {"int": [self.low, self.high]}
            form.update({"step": self.step} if self.step != 1 else {})
            form.update({"log": True} if self.log else {})
        else:
            form = {"logfloat" if self.log else "float": [self.low, self.high]}
        if self.when:
            form["when"] = {k: list(v) for k, v in self.when.items()}
        return form

    def distribution(self) -> optuna.distributions.BaseDistribution:
        from optuna.distributions import (
            CategoricalDistribution,
            FloatDistribution,
            IntDistribution,
        )

        if self.kind in CATEGORICAL:
            return CategoricalDistribution(list(self.choices))
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=self.step)
        return FloatDistribution(float(self.low), float(self.high), log=self.log)

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind in CATEGORICAL:
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(
                self.key, int(self.low), int(self.high), step=self.step, log=self.log
            )
        return trial.suggest_float(self.key, float(self.low), float(self.high), log=self.log)


def parse_dimension(key: str, raw: Any) -> Dimension:
    """Read one ``search.space`` entry (see the module docstring for the forms)."""
    where = f"search.space.{key}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}={raw!r} is invalid: allowed one of {_FORMS_TEXT}")
    tags = [tag for tag in DIMENSION_FORMS if tag in raw]
    if len(tags) != 1:
        raise ConfigError(f"{where}={raw!r} is invalid: allowed exactly one of {_FORMS_TEXT}")
    tag = tags[0]
    extra = sorted(set(raw) - {tag, *DIMENSION_FORMS[tag]})
    if extra:
        options = ", ".join(DIMENSION_FORMS[tag])
        raise ConfigError(
            f"{where}.{extra[0]}={raw[extra[0]]!r} is invalid: unknown option of a {tag} "
            f"dimension; allowed: {options}"
        )
    when = _parse_when(where, raw.get("when", {}))
    values = raw[tag]
    if tag == "cases":
        if not isinstance(values, dict):
            raise ConfigError(
                f"{where}.cases={values!r} is invalid: allowed a mapping of case name to "
                "{dotted key: value}"
            )
        return Dimension(key, "cases", cases={str(k): v for k, v in values.items()}, when=when)
    if tag == "choice":
        if not isinstance(values, list):
            raise ConfigError(f"{where}.choice={values!r} is invalid: allowed a non-empty list")
        return Dimension(key, "choice", choices=tuple(values), when=when)
    if not isinstance(values, list) or len(values) != 2:
        raise ConfigError(f"{where}.{tag}={values!r} is invalid: allowed a list [low, high]")
    log = raw.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}.log={log!r} is invalid: allowed true or false")
    low, high = values
    if tag == "int":
        return Dimension(
            key, "int", low=low, high=high, step=raw.get("step", 1), log=log, when=when
        )
    if _is_number(low) and _is_number(high):
        low, high = float(low), float(high)
    return Dimension(key, "float", low=low, high=high, log=log or tag == "logfloat", when=when)


def _parse_when(where: str, raw: Any) -> dict[str, tuple[Any, ...]]:
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{where}.when={raw!r} is invalid: allowed a mapping of earlier keys to values"
        )
    return {name: tuple(v) if isinstance(v, list) else (v,) for name, v in raw.items()}


def parse_space(raw: Any) -> dict[str, Dimension]:
    """Read ``search.space``: a non-empty mapping, ``when`` naming earlier choice dimensions."""
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(
            f"search.space={raw!r} is invalid: allowed a mapping of at least one dotted "
            "settings key to a dimension"
        )
    space: dict[str, Dimension] = {}
    for key, form in raw.items():
        dimension = parse_dimension(str(key), form)
        for name, allowed in dimension.when.items():
            earlier = space.get(name)
            if earlier is None or earlier.kind not in CATEGORICAL:
                raise ConfigError(
                    f"search.space.{key}.when.{name}={list(allowed)!r} is invalid: allowed only "
                    f"choice or cases dimensions listed before {key}: "
                    f"{', '.join(space) or 'none'}"
                )
            for value in allowed:
                if not any(_same(value, c) for c in earlier.choices):
                    raise ConfigError(
                        f"search.space.{key}.when.{name}={value!r} is invalid: allowed one of "
                        f"its choices {list(earlier.choices)!r}"
                    )
        space[dimension.key] = dimension
    return space


# -- checks against the trial settings ---------------------------------------------------


def expand_params(params: dict[str, Any], space: dict[str, Dimension]) -> dict[str, Any]:
    """Sampled ``params`` as dotted settings overrides: each case name replaced by its
    settings; keys that are no dimension pass through (the caller rejects them)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        dimension = space.get(key)
        out.update(dimension.settings_of(value) if dimension is not None else {key: value})
    return out


def _condition_context(dimension: Dimension, space: dict[str, Dimension]) -> dict[str, Any]:
    """Values that make ``dimension`` active: the first allowed value along its ``when`` chain."""
    context: dict[str, Any] = {}
    for name, allowed in dimension.when.items():
        context.update(_condition_context(space[name], space))
        context.update(space[name].settings_of(allowed[0]))
    return context


def check_values(settings: TrialSettings, space: dict[str, Dimension]) -> None:
    """Build ``settings`` with each choice and range end substituted, so a bad value fails now.

    Each value is tried with the other dimensions at their fixed values, except those
    its ``when`` needs. The error names the dimension, the value and the settings rule.
    """
    for dimension in space.values():
        context = _condition_context(dimension, space)
        for value in dimension.candidates():
            try:
                settings.replace(**{**context, **dimension.settings_of(value)})
            except ConfigError as exc:
                raise ConfigError(
                    f"search.space.{dimension.key}={value!r} is invalid: the settings reject it "
                    f"({exc})"
                ) from None


def _corner_samples(space: dict[str, Dimension], limit: int, seed: int) -> list[dict[str, Any]]:
    """Assignments of candidate values honouring ``when``: all if few, else ``limit`` random."""
    dims = list(space.values())
    if math.prod(len(d.candidates()) for d in dims) <= limit:
        samples = []
        for combo in itertools.product(*(d.candidates() for d in dims)):
            params: dict[str, Any] = {}
            for dimension, value in zip(dims, combo, strict=True):
                if dimension.active(params):
                    params[dimension.key] = value
            samples.append(params)
        return samples
    rng = random.Random(seed)
    samples = []
    for _ in range(limit):
        params = {}
        for dimension in dims:
            if dimension.active(params):
                params[dimension.key] = rng.choice(dimension.candidates())
        samples.append(params)
    return samples


def invalid_combinations(
    settings: TrialSettings, space: dict[str, Dimension], *, limit: int = 64, seed: int = 0
) -> list[tuple[dict[str, Any], str]]:
    """Combinations of choices and range ends that the settings reject, with the reason.

    Exhaustive when the space has at most ``limit`` such corners, else a seeded random
    sample of ``limit``: a cheap check that catches knobs which are only valid together
    (e.g. EBB without ``when: {method.weight.bases: 2}``), not a proof.
    """
    failures: dict[str, tuple[dict[str, Any], str]] = {}
    for params in _corner_samples(space, limit, seed):
        try:
            settings.replace(**expand_params(params, space))
        except ConfigError as exc:
            failures.setdefault(str(exc), (params, str(exc)))
    return list(failures.values())


# -- Optuna ----------------------------------------------------------------------------


def optuna_distributions(search: SearchSpec) -> dict[str, optuna.distributions.BaseDistribution]:
    """``{dotted key: distribution}`` for every dimension, ignoring ``when``."""
    return {key: dimension.distribution() for key, dimension in search.space.items()}


@dataclass(frozen=True)
class DefineByRunSpace:
    """A define-by-run space for ``OptunaSearch(space=...)``: suggests active dimensions in order.

    A class rather than a closure because Tune pickles the searcher (with plain
    ``pickle``) when it checkpoints the experiment.
    """

    dimensions: tuple[Dimension, ...]

    def __call__(self, trial: optuna.Trial) -> None:
        params: dict[str, Any] = {}
        for dimension in self.dimensions:
            if dimension.active(params):
                params[dimension.key] = dimension.suggest(trial)


def optuna_space(search: SearchSpec) -> dict[str, Any] | DefineByRunSpace:
    """The ``space`` argument of ``OptunaSearch``: a distribution dict, or define-by-run if
    any dimension has ``when`` (a fixed dict cannot leave a parameter out)."""
    if search.conditional:
        return DefineByRunSpace(tuple(search.space.values()))
    return optuna_distributions(search)


def build_sampler(search: SearchSpec) -> optuna.samplers.BaseSampler:
    """The Optuna sampler of ``search.algorithm``, seeded with ``search.sampler_seed``."""
    import optuna

    seed = search.sampler_seed
    if search.algorithm == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=search.population_size, seed=seed)
    if search.algorithm == "tpe":
        with warnings.catch_warnings():
            # multivariate/group are flagged experimental; they are what lets TPE model
            # interacting knobs and conditional (``when``) dimensions.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(
                multivariate=True,
                group=search.conditional,
                n_startup_trials=search.startup_trials,
                seed=seed,
            )
    if search.algorithm == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    grid = {key: list(dimension.choices) for key, dimension in search.space.items()}
    return optuna.samplers.GridSampler(grid, seed=seed)


# -- dry run -----------------------------------------------------------------------------


def _range_text(dimension: Dimension) -> str:
    if dimension.kind == "choice":
        return ", ".join(repr(v) if isinstance(v, str) else str(v) for v in dimension.choices)
    text = f"[{dimension.low:g}, {dimension.high:g}]"
    text += f" step {dimension.step}" if dimension.kind == "int" and dimension.step != 1 else ""
    return text + (" log" if dimension.kind == "int" and dimension.log else "")


def describe_space(spec: StudySpec) -> Table:
    """A rich table of the searched keys, their ranges, conditions and fixed values."""
    from rich.table import Table

    search = spec.search
    objectives = ", ".join(f"{o.metric} ({o.direction})" for o in search.objectives)
    table = Table(
        title=f"{spec.name}: {search.algorithm}, {search.trials} trials x "
        f"{len(search.seeds)} seed(s), profile {spec.profile or 'none'}",
        caption=f"objectives: {objectives}",
    )
    for column in ("key", "kind", "values", "when", "fixed value"):
        table.add_column(column)
    fixed = spec.settings.flat()
    for dimension in search.space.values():
        when = "; ".join(f"{k} in {list(v)}" for k, v in dimension.when.items())
        if dimension.kind == "cases":  # a row per case: what it sets, and the fixed values
            for name, settings in dimension.cases.items():
                values = ", ".join(f"{k}={v!r}" for k, v in settings.items())
                before = ", ".join(repr(fixed[k]) for k in settings)
                table.add_row(f"{dimension.key}={name}", "case", values, when, before)
            continue
        kind = "logfloat" if dimension.kind == "float" and dimension.log else dimension.kind
        table.add_row(dimension.key, kind, _range_text(dimension), when, repr(fixed[dimension.key]))
    return table


@dataclass(frozen=True)
class CostModel:
    """Seconds per unit of work for one trial worker: an estimate to size a study, not a
    measurement. Image costs are at ``reference_resolution`` and scale with pixel count."""

    name: str
    train_image_s: float  # one image through a QAT step: student fwd+bwd, teacher fwd, LRM
    teacher_image_s: float  # one image through an FP pretraining step of the teacher
    sample_image_step_s: float  # one image through one denoising step of the quantized UNet
    feature_image_s: float  # one image through the FID feature extractor
    trial_overhead_s: float  # worker start, model build, checkpoints, logging
    reference_resolution: int


#: One CPU core, tiny preset at 16 px: a 0.7M-parameter UNet2DModel takes ~0.25 s per FP
#: step at batch 64 on this project's CPU; fake quantization and the teacher's forward
#: roughly double that. FID features at 64-d run at ~40 images/s.
CPU_COST = CostModel("cpu", 7.8e-3, 4.7e-3, 3e-3, 1 / 40, 20.0, 16)
#: One H100-class GPU, ddpm-cifar10 preset at 32 px (35.7M parameters), fp32.
GPU_COST = CostModel("gpu", 2e-3, 1.2e-3, 2e-4, 5e-4, 60.0, 32)


def _typical(spec: StudySpec, key: str) -> float:
    """The fixed value of ``key``, or the middle of its dimension if it is searched."""
    dimension = spec.search.space.get(key)
    cases = [d for d in spec.search.space.values() if d.kind == "cases"]
    if dimension is None:
        values = [c[key] for d in cases for c in d.cases.values() if key in c]
        if values:
            return statistics.fmean(float(v) for v in values)
        return float(spec.settings.flat()[key])
    if dimension.kind == "choice":
        return statistics.fmean(float(v) for v in dimension.choices)
    if dimension.log:
        return math.sqrt(dimension.low * dimension.high)
    return (dimension.low + dimension.high) / 2


def estimate_cost(
    spec: StudySpec,
    *,
    cost: CostModel | None = None,
    cluster_cpus: float | None = None,
    cluster_gpus: float = 0,
) -> dict[str, Any]:
    """Rough run time of a study: an estimate from step counts and ``cost`` constants.

    Searched step counts and sizes count at the middle of their range. Seeds of one
    configuration run one after another inside its trial; the teacher is pretrained
    once and cached (0 s if ``teacher.pretrained`` is set or it is already cached).
    """
    settings = spec.settings
    cost = cost or (GPU_COST if settings.workers.use_gpu else CPU_COST)
    pixels = (_typical(spec, "data.resolution") / cost.reference_resolution) ** 2
    samples = _typical(spec, "evaluation.fid_samples")
    train_s = (
        _typical(spec, "training.steps")
        * _typical(spec, "training.batch_size")
        * cost.train_image_s
    )
    sample_s = samples * _typical(spec, "evaluation.sampling_steps") * cost.sample_image_step_s
    test_loss_s = _typical(spec, "evaluation.test_loss_images") * cost.sample_image_step_s
    run_s = (train_s + sample_s + test_loss_s) * pixels
    run_s += samples * cost.feature_image_s + cost.trial_overhead_s
    teacher = settings.teacher
    teacher_s = 0.0
    if teacher.pretrained is None:
        teacher_s = teacher.steps * teacher.batch_size * cost.teacher_image_s * pixels
    cpus = (os.cpu_count() or 1) if cluster_cpus is None else cluster_cpus
    concurrent = spec.max_concurrent_trials(cluster_cpus=cpus, cluster_gpus=cluster_gpus)
    trials, seeds = spec.search.trials, len(spec.search.seeds)
    return {
        "cost_model": cost.name,
        "trials": trials,
        "seeds": seeds,
        "runs": trials * seeds,
        "concurrent_trials": concurrent,
        "seconds_per_run": run_s,
        "teacher_seconds": teacher_s,
        "wall_seconds": teacher_s + math.ceil(trials / concurrent) * seeds * run_s,
    }
