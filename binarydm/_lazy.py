"""Re-exports that load their module on first use (PEP 562), for the packages whose
modules pull in Ray, MLflow or torch: ``from binarydm.train import TrialSettings`` must
not import the trial loop, and ``binarydm.spec`` must stay free of Ray and MLflow.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable, Callable]:
    """The package's ``__getattr__`` and ``__dir__``: name -> its ``package.<module>``."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__


def by_module(table: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """``{module: (names...)}`` -> ``{name: module}`` (a name exported twice is a bug)."""
    out: dict[str, str] = {}
    for module, names in table.items():
        for name in names:
            if name in out:
                raise ValueError(f"{name} exported by both {out[name]} and {module}")
            out[name] = module
    return out
