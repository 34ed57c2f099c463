"""Search dimensions of a study file: their YAML forms, parsing and conditions.

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
sampled name back into its settings). ``binarydm.search`` turns these dimensions
into Optuna distributions; this module only reads and checks them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from binarydm._typed import ConfigError

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


def parse_dimension(key: str, raw: Any) -> Dimension:
    """Read one ``search.space`` entry (see the module docstring for the forms)."""
    where = f"search.space.{key}"
    tag = _form_tag(where, raw)
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
    return _parse_range(key, tag, raw, when)


def _form_tag(where: str, raw: Any) -> str:
    """The one YAML tag of a dimension mapping, its other keys checked against the tag's options."""
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
    return tag


def _parse_range(
    key: str, tag: str, raw: dict[str, Any], when: dict[str, tuple[Any, ...]]
) -> Dimension:
    """An ``int``, ``float`` or ``logfloat`` dimension."""
    where = f"search.space.{key}"
    values = raw[tag]
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


def expand_params(params: dict[str, Any], space: dict[str, Dimension]) -> dict[str, Any]:
    """Sampled ``params`` as dotted settings overrides: each case name replaced by its
    settings; keys that are no dimension pass through (the caller rejects them)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        dimension = space.get(key)
        out.update(dimension.settings_of(value) if dimension is not None else {key: value})
    return out
