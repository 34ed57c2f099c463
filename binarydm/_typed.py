"""Strict construction of nested frozen dataclasses from plain dicts (YAML/JSON).

Shared by ``BinaryDMConfig`` and the study-file types so that every bad value is
reported the same way: one line naming the dotted key, the value, and what is
allowed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from typing import Any, ClassVar, Literal, Self, get_args, get_origin


class ConfigError(ValueError):
    """A config value out of its allowed set; the message names key, value and what is allowed."""


#: The key under which a serialised config carries its class's ``CONFIG_VERSION``.
VERSION_KEY = "config_version"


class FrozenConfig:
    """Serialisation shared by the frozen config dataclasses: dicts, JSON, dotted keys.

    ``from_dict`` is strict (``build``); ``replace`` overrides dotted keys and
    validates the result again, so a copy is never less checked than the original.
    The stored forms (``to_versioned_dict``, ``to_json``) carry ``config_version``;
    ``from_dict`` refuses another version instead of guessing and reads a dict without
    one (older runs, the study file's ``settings``) as the current version.
    """

    #: Version of the class's schema: bumped when a field changes meaning or is removed.
    CONFIG_VERSION: ClassVar[int] = 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def to_versioned_dict(self) -> dict[str, Any]:
        """``to_dict`` plus ``config_version``: the form written to checkpoints and runs."""
        return {VERSION_KEY: self.CONFIG_VERSION, **self.to_dict()}

    def to_json(self) -> str:
        return json.dumps(self.to_versioned_dict(), sort_keys=True)

    def flat(self) -> dict[str, Any]:
        """Dotted-key view (``weight.bases`` -> 2): the form search spaces and MLflow use."""
        return flatten(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Strictly from ``to_dict()`` or ``to_versioned_dict()`` output."""
        if not isinstance(data, dict) or VERSION_KEY not in data:
            return build(cls, data)
        data = dict(data)
        version = data.pop(VERSION_KEY)
        require(
            version == cls.CONFIG_VERSION,
            f"{cls.__name__}.{VERSION_KEY}",
            version,
            f"{cls.CONFIG_VERSION} (written by another binarydm version: rerun or re-export "
            "with this one)",
        )
        return build(cls, data)

    @classmethod
    def from_json(cls, text: str) -> Self:
        return cls.from_dict(json.loads(text))

    def replace(self, **dotted: Any) -> Self:
        """A copy with dotted keys overridden, validated again (``replace(**{"a.b": 1})``)."""
        data = self.to_dict()
        for key, value in dotted.items():
            set_dotted(data, key, value)
        return type(self).from_dict(data)


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: allowed {allowed}")


def build(cls: type, data: Any, prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` from ``data``, recursing into dataclass-typed fields."""
    where = prefix.rstrip(".") or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{where}={data!r} is invalid: expected a mapping")
    hints = _type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}={data[unknown[0]]!r} is invalid: unknown key; "
            f"allowed: {', '.join(fields)}"
        )
    kwargs = {name: coerce(f"{prefix}{name}", hints[name], value) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field missing
        raise ConfigError(f"{where} is invalid: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(_qualify(str(exc), prefix)) from None


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    # get_type_hints re-evaluates string annotations on every call: most of a load's time.
    return typing.get_type_hints(cls)


def _qualify(message: str, prefix: str) -> str:
    """Give a nested class's own error its full dotted key (``weight.bases`` under ``method.``)."""
    key, sep, rest = message.partition("=")
    if not prefix or not sep or " " in key or key.startswith(prefix):
        return message
    outer = prefix.rstrip(".").split(".")
    inner = key.split(".")
    overlap = next(
        (n for n in range(min(len(outer), len(inner)), 0, -1) if outer[-n:] == inner[:n]), 0
    )
    return ".".join(outer + inner[overlap:]) + sep + rest


def coerce(key: str, annotation: Any, value: Any) -> Any:
    """Check ``value`` against a type annotation; ints are accepted for floats, never bools."""
    origin = get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        return build(annotation, value, f"{key}.")
    if origin is Literal:
        allowed = get_args(annotation)
        require(value in allowed, key, value, "one of " + ", ".join(repr(a) for a in allowed))
        return value
    if origin in (typing.Union, types.UnionType):
        options = get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(key, option, value)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}={value!r} is invalid")
    if origin in (list, tuple):
        require(isinstance(value, list | tuple), key, value, "a list")
        (item_type, *_) = get_args(annotation) or (Any,)
        items = [coerce(f"{key}[{i}]", item_type, v) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        require(isinstance(value, dict), key, value, "a mapping")
        return dict(value)
    if annotation is bool:
        require(isinstance(value, bool), key, value, "true or false")
    elif annotation is int:
        require(isinstance(value, int) and not isinstance(value, bool), key, value, "an integer")
    elif annotation is float:
        require(
            isinstance(value, int | float) and not isinstance(value, bool), key, value, "a number"
        )
        return float(value)
    elif annotation is str:
        require(isinstance(value, str), key, value, "a string")
    return value


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data["a"]["b"] = value`` for ``key = "a.b"``; unknown keys are an error."""
    parts = key.split(".")
    node = data
    for depth, part in enumerate(parts[:-1]):
        if not isinstance(node, dict) or part not in node or not isinstance(node[part], dict):
            here = ".".join(parts[: depth + 1])
            raise ConfigError(f"{key}={value!r} is invalid: unknown key {here!r}")
        node = node[part]
    if parts[-1] not in node:
        allowed = ", ".join(sorted(node))
        raise ConfigError(f"{key}={value!r} is invalid: unknown key; allowed here: {allowed}")
    node[parts[-1]] = value
