"""Checks of a search space against the trial settings, before any trial runs.

``check_values`` builds the settings with every choice and range end of each
dimension; ``invalid_combinations`` tries combinations of them, so knobs that are
only valid together fail when the study file is loaded, not in a trial.
"""

from __future__ import annotations

import itertools
import math
import random
from typing import TYPE_CHECKING, Any

from binarydm._typed import ConfigError
from binarydm.spec._dimensions import Dimension, expand_params

if TYPE_CHECKING:
    from binarydm.train.settings import TrialSettings


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
