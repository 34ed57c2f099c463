"""JSON Schema (draft 2020-12) of the study file, generated from the study dataclasses.

Types, enums (from ``Literal``), defaults and required keys come from the same
frozen dataclasses ``load_study`` builds, the dimension forms from
``DIMENSION_FORMS``, and the allowed dotted keys from ``TrialSettings``, so
the schema cannot drift from the parser. Value ranges that only the classes'
``__post_init__`` knows (``bases`` in 1..3) stay with the parser. Editors use it
through the first line of every shipped study::

    # yaml-language-server: $schema=study.schema.json

Regenerate the shipped copy with ``python -m binarydm.spec.schema``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from binarydm.spec._dimensions import DIMENSION_FORMS
from binarydm.spec._keys import METRIC_DIRECTIONS, SEARCHABLE_KEYS, SETTINGS_KEYS
from binarydm.spec._types import SearchSpec, StudySpec, override_keys

DIALECT = "https://json-schema.org/draft/2020-12/schema"
#: Where the repository keeps the generated schema, beside the studies that use it.
SHIPPED_SCHEMA = Path(__file__).resolve().parents[2] / "search_spaces" / "study.schema.json"

_SIMPLE = {bool: "boolean", int: "integer", float: "number", str: "string"}
#: The key of a cases dimension: a label without dots.
CASES_LABEL = r"^[^.]+$"
_SCALAR = {"type": ["string", "number", "boolean", "null"]}


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _type_schema(annotation: Any, defs: dict[str, Any]) -> dict[str, Any]:
    origin = get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        name = annotation.__name__
        if name not in defs:
            defs[name] = {}  # placeholder first: guards against recursion
            defs[name] = _object_schema(annotation, defs)
        return {"$ref": f"#/$defs/{name}"}
    if origin is Literal:
        values = list(get_args(annotation))
        kinds = {_SIMPLE[type(v)] for v in values}
        return {"type": kinds.pop(), "enum": values} if len(kinds) == 1 else {"enum": values}
    if origin in (typing.Union, types.UnionType):
        options = [a for a in get_args(annotation) if a is not type(None)]
        nullable = len(options) < len(get_args(annotation))
        schemas = [_type_schema(option, defs) for option in options]
        if nullable:
            schemas.append({"type": "null"})
        if all(set(s) == {"type"} and isinstance(s["type"], str) for s in schemas):
            return {"type": [s["type"] for s in schemas]}
        return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    if origin in (list, tuple):
        (item, *_) = get_args(annotation) or (Any,)
        return {"type": "array", "items": _type_schema(item, defs)}
    if origin is dict:
        _, value = get_args(annotation) or (str, Any)
        return {"type": "object", "additionalProperties": _type_schema(value, defs)}
    if annotation in _SIMPLE:
        return {"type": _SIMPLE[annotation]}
    return {}


def _object_schema(cls: type, defs: dict[str, Any]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    properties: dict[str, Any] = {}
    required = []
    for f in dataclasses.fields(cls):
        if not f.metadata.get("file", True):
            continue
        special = _SPECIAL_FIELDS.get((cls, f.name))
        schema = special() if special else _type_schema(hints[f.name], defs)
        if "doc" in f.metadata:
            schema = {"description": f.metadata["doc"], **schema}
        has_default = f.default is not dataclasses.MISSING
        if not has_default and f.default_factory is dataclasses.MISSING:
            required.append(f.name)
        elif has_default and not dataclasses.is_dataclass(hints[f.name]):
            schema["default"] = _jsonable(f.default)
        properties[f.name] = schema
    schema = {
        "type": "object",
        "description": inspect.getdoc(cls).split("\n\n")[0],
        "properties": properties,
        "additionalProperties": False,
    }
    if required:
        schema["required"] = required
    return schema


def _dimension_schema() -> dict[str, Any]:
    """One ``oneOf`` branch per YAML tag of ``DIMENSION_FORMS``."""
    pair = {"type": "array", "minItems": 2, "maxItems": 2}
    tags = {
        "choice": {"type": "array", "minItems": 1, "items": _SCALAR},
        "int": {**pair, "items": {"type": "integer"}},
        "float": {**pair, "items": {"type": "number"}},
        "logfloat": {**pair, "items": {"type": "number", "exclusiveMinimum": 0}},
        "cases": {
            "description": "named configurations: case name -> {dotted settings key: value}",
            "type": "object",
            "minProperties": 1,
            "additionalProperties": {
                "type": "object",
                "minProperties": 1,
                "propertyNames": {"enum": list(SEARCHABLE_KEYS)},
                "additionalProperties": _SCALAR,
            },
        },
    }
    options = {
        "step": {"type": "integer", "minimum": 1, "default": 1},
        "log": {"type": "boolean", "default": False},
        "when": {
            "description": "sample only if these earlier choice or cases dimensions took "
            "these values",
            "type": "object",
            "propertyNames": {"anyOf": [{"enum": list(SEARCHABLE_KEYS)}, {"pattern": CASES_LABEL}]},
            "additionalProperties": {"anyOf": [_SCALAR, {"type": "array", "items": _SCALAR}]},
        },
    }
    forms = []
    for tag, allowed in DIMENSION_FORMS.items():
        forms.append(
            {
                "type": "object",
                "properties": {tag: tags[tag], **{name: options[name] for name in allowed}},
                "required": [tag],
                "additionalProperties": False,
            }
        )
    return {"oneOf": forms}


def _space_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "minProperties": 1,
        # A dotted settings key, or the label of a cases dimension (no dots).
        "propertyNames": {"anyOf": [{"enum": list(SEARCHABLE_KEYS)}, {"pattern": CASES_LABEL}]},
        "additionalProperties": {"$ref": "#/$defs/Dimension"},
    }


def _profiles_schema() -> dict[str, Any]:
    key = {
        "anyOf": [
            {"enum": list(SETTINGS_KEYS)},
            {"enum": override_keys()},
            {"pattern": r"^search\.space\..+$"},
        ]
    }
    return {
        "type": "object",
        "propertyNames": {"not": {"const": "none"}},
        "additionalProperties": {"type": "object", "propertyNames": key},
    }


def _reference_point_schema() -> dict[str, Any]:
    return {
        "type": ["object", "null"],
        "propertyNames": {"enum": list(METRIC_DIRECTIONS)},
        "additionalProperties": {"type": "number"},
    }


_SPECIAL_FIELDS = {
    (SearchSpec, "space"): _space_schema,
    (StudySpec, "profiles"): _profiles_schema,
    (SearchSpec, "reference_point"): _reference_point_schema,
}


def study_schema() -> dict[str, Any]:
    """The JSON Schema of a study file."""
    defs: dict[str, Any] = {"Dimension": _dimension_schema()}
    root = _object_schema(StudySpec, defs)
    # A study's runs take their seeds from search.seeds; the parser rejects settings.seed.
    defs["TrialSettings"]["properties"].pop("seed")
    return {
        "$schema": DIALECT,
        "title": "BinaryDM study file",
        **root,
        "$defs": dict(sorted(defs.items())),
    }


def schema_text() -> str:
    return json.dumps(study_schema(), indent=2) + "\n"


def write_schema(path: str | os.PathLike[str] = SHIPPED_SCHEMA) -> Path:
    """Write the schema to ``path`` (default: the repository's search_spaces/)."""
    path = Path(path)
    path.write_text(schema_text(), encoding="utf-8")
    return path


if __name__ == "__main__":
    print(write_schema(*sys.argv[1:2]))
