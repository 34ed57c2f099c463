"""Reading a study file: YAML, profiles and ``--set`` overrides, into a ``StudySpec``.

``load_study`` reads the file, ``parse_study`` checks an already-read mapping: the
file must be valid without a profile, every profile is checked, and the selected
profile and then the command line's overrides are applied. Every error is one
``ConfigError`` line naming the file, the key, the bad value and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from binarydm._typed import ConfigError, build, require
from binarydm.spec._combinations import check_values, invalid_combinations
from binarydm.spec._dimensions import Dimension, parse_space
from binarydm.spec._keys import NO_PROFILE, SEARCHABLE_KEYS, SETTINGS_KEYS, UNSEARCHABLE
from binarydm.spec._types import (
    FILE_KEYS,
    ResourceSpec,
    SearchSpec,
    StorageSpec,
    StudySpec,
    TrackingSpec,
    override_keys,
)
from binarydm.train.settings import TrialSettings

_COMBINATION_SAMPLES = 32
#: The repository's studies (absent from an installed wheel: then no list is offered).
SHIPPED_STUDIES = Path(__file__).resolve().parents[2] / "search_spaces"
_SPACE_KEY = re.compile(r"^search\.space\..+$")
_SEED_ALLOWED = "not set here: each run's seed comes from search.seeds"


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
        studies = _shipped_studies(path.parent)
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


def _shipped_studies(folder: Path) -> list[str]:
    """The studies shipped in ``search_spaces/``: by name when ``folder`` is that folder,
    else by path (from the cwd where it can): other YAML files beside a typo are no studies.
    """
    if not SHIPPED_STUDIES.is_dir():
        return []
    studies = sorted(SHIPPED_STUDIES.glob("*.yaml"))
    if folder.resolve() == SHIPPED_STUDIES:
        return [study.name for study in studies]
    cwd = Path.cwd()
    return [str(s.relative_to(cwd) if s.is_relative_to(cwd) else s) for s in studies]


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
        profile_replaced=_replaced_by_profile(fixed, base, settings, profile_settings, cli),
    )


_UNSET = object()


def _file_value(fixed: Mapping[str, Any], key: str) -> Any:
    """The value the file's ``settings`` mapping gives dotted ``key``, or ``_UNSET``."""
    node: Any = fixed
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _UNSET
        node = node[part]
    return node


def _replaced_by_profile(fixed, base, settings, profile_settings, cli) -> tuple:
    """The keys the file's ``settings`` set and the profile changed (``--set`` ones are the
    user's explicit choice, so not reported): (key, file value, profile value)."""
    before, after = base.flat(), settings.flat()
    out = []
    for key in sorted(profile_settings):
        if key in cli or _file_value(fixed, key) is _UNSET:
            continue
        if before.get(key) != after.get(key):
            out.append((key, before.get(key), after.get(key)))
    return tuple(out)


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
