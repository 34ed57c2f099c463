"""Pareto fronts and exact hypervolumes of a study's objective values.

Numpy only (no Ray, no MLflow), so the study driver, ``bdm-search pareto`` and the
tests share one implementation. Every function takes the objective values as an
``(n, m)`` array plus one direction per column; internally maximised columns are
negated so that the algorithms only ever minimise.

Rows holding a NaN (a trial that reported no value for some objective) are never on
the front, never dominate another row and add no volume.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _signs(directions: Sequence[str]) -> np.ndarray:
    signs = []
    for direction in directions:
        if direction not in ("minimize", "maximize"):
            raise ValueError(
                f"direction={direction!r} is invalid: allowed 'minimize' or 'maximize'"
            )
        signs.append(1.0 if direction == "minimize" else -1.0)
    return np.asarray(signs)


def _as_minimization(points: object, directions: Sequence[str]) -> np.ndarray:
    """``points`` as a float ``(n, m)`` array in which smaller is better in every column."""
    signs = _signs(directions)
    values = np.asarray(points, dtype=float)
    if values.size == 0:
        return values.reshape(0, len(signs))
    if values.ndim != 2 or values.shape[1] != len(signs):
        raise ValueError(
            f"points of shape {values.shape} do not match {len(signs)} directions: "
            "expected an (n, m) array with one column per objective"
        )
    return values * signs


def _non_dominated(values: np.ndarray) -> np.ndarray:
    """Mask of rows no other row dominates (minimisation, no NaN). Equal rows keep each other."""
    no_worse = (values[:, None, :] <= values[None, :, :]).all(axis=-1)  # [j, i]: j <= i everywhere
    better = (values[:, None, :] < values[None, :, :]).any(axis=-1)  # [j, i]: j < i somewhere
    return ~(no_worse & better).any(axis=0)


def pareto_front(points: object, directions: Sequence[str]) -> np.ndarray:
    """Boolean mask of the non-dominated rows of ``points`` (shape ``(n, m)``).

    A row is dominated when another row is at least as good in every objective and
    strictly better in one; identical rows therefore do not dominate each other and
    are all on the front, as Optuna's ``best_trials`` reports them.
    """
    values = _as_minimization(points, directions)
    mask = np.zeros(len(values), dtype=bool)
    complete = ~np.isnan(values).any(axis=1)
    if complete.any():
        mask[complete] = _non_dominated(values[complete])
    return mask


def _slice_volume(values: np.ndarray, reference: np.ndarray) -> float:
    """Exact volume dominated by ``values`` (all strictly inside ``reference``), minimisation.

    Hypervolume by slicing objectives (HSO, While et al. 2006): sort by the last
    objective and, between consecutive values, add slab depth times the (m-1)-D
    volume of the points already passed. Exponential in m, fine for a study's size.
    """
    n, m = values.shape
    if n == 0:
        return 0.0
    if m == 1:
        return float(reference[0] - values[:, 0].min())
    if m == 2:
        order = np.argsort(values[:, 0], kind="stable")
        xs, ys = values[order, 0], values[order, 1]
        # Between x_i and x_{i+1} the covered height is set by the best y seen so far,
        # which also makes dominated rows harmless.
        best_y = np.minimum.accumulate(ys)
        widths = np.diff(np.append(xs, reference[0]))
        return float(np.sum(widths * (reference[1] - best_y)))
    order = np.argsort(values[:, -1], kind="stable")
    ordered = values[order]
    upper = np.append(ordered[1:, -1], reference[-1])
    total = 0.0
    for i in range(n):
        depth = upper[i] - ordered[i, -1]
        if depth > 0:
            passed = ordered[: i + 1, :-1]
            total += depth * _slice_volume(passed[_non_dominated(passed)], reference[:-1])
    return total


def hypervolume(
    points: object, reference_point: Sequence[float], directions: Sequence[str]
) -> float:
    """Volume of objective space dominated by ``points`` and bounded by ``reference_point``.

    Exact. Points not strictly better than the reference in every objective add
    nothing (they bound no box); duplicates count once.
    """
    values = _as_minimization(points, directions)
    reference = _as_minimization([list(reference_point)], directions)[0]
    if np.isnan(reference).any():
        raise ValueError(f"reference_point={list(reference_point)!r} is invalid: NaN")
    values = values[~np.isnan(values).any(axis=1)]
    values = values[(values < reference).all(axis=1)]
    if len(values) == 0:
        return 0.0
    values = np.unique(values, axis=0)
    return _slice_volume(values[_non_dominated(values)], reference)


def default_reference_point(
    points: object, directions: Sequence[str], factor: float = 1.1
) -> np.ndarray:
    """A reference point just beyond the worst finite value of each objective.

    Minimised objective: ``worst + (factor - 1) * |worst|``, i.e. ``1.1 x worst`` for
    positive values such as FID, OPs and size. Maximised objective: the mirror,
    ``worst - (factor - 1) * |worst|`` (``0.9 x`` the smallest saving), so the worst
    point still bounds a box of non-zero width. Where the worst value is 0 the
    margin is ``(factor - 1)`` times the spread of that objective, or
    ``factor - 1`` if every point has the same value. Rows with NaN or infinite
    values are ignored: an infinite reference would make every hypervolume infinite.
    """
    if factor <= 1:
        raise ValueError(f"factor={factor!r} is invalid: allowed a number > 1")
    signs = _signs(directions)
    values = _as_minimization(points, directions)
    values = values[np.isfinite(values).all(axis=1)]
    if len(values) == 0:
        raise ValueError("no finite objective values to derive a reference point from")
    worst, best = values.max(axis=0), values.min(axis=0)
    margin = (factor - 1) * np.abs(worst)
    margin = np.where(margin > 0, margin, (factor - 1) * (worst - best))
    margin = np.where(margin > 0, margin, factor - 1)
    return (worst + margin) * signs


def hypervolume_history(
    points: object,
    finished_at: Sequence[float],
    reference_point: Sequence[float],
    directions: Sequence[str],
) -> list[tuple[float, float]]:
    """``(time, hypervolume of the points finished by then)`` at each finishing time.

    ``finished_at[i]`` is when ``points[i]`` became known; ties count together (one
    entry per distinct time). Non-decreasing by construction: a new point can only add
    volume. An empty input gives an empty history.
    """
    values = np.asarray(points, dtype=float)
    times = np.asarray(finished_at, dtype=float)
    if len(values) != len(times):
        raise ValueError(f"{len(values)} points but {len(times)} finishing times")
    history: list[tuple[float, float]] = []
    for moment in np.unique(times):
        known = values[times <= moment]
        history.append((float(moment), hypervolume(known, reference_point, directions)))
    return history
