"""What the Pareto plots show, shared by the PNG (matplotlib) and the HTML page (SVG).

Which points are drawn (those with every objective), which objective pairs get a
panel, the front of a panel, where the FP teacher's point belongs, the axis titles and
the colours, so both renderings of a study always agree.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

DOMINATED_COLOR = "#9e9e9e"
PARETO_COLOR = "#d62728"
FP_COLOR = "#1f77b4"
FP_LABEL = "FP teacher (reference)"


def finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and math.isfinite(value)


def fp_in_panel(fp: Mapping[str, Any] | None, x: str, y: str) -> bool:
    # The FP model has no trial number: the one-objective panel (x = trial_id) leaves it out.
    return fp is not None and finite(fp.get(x)) and finite(fp.get(y))


def axis_label(metric: str, directions: dict[str, str]) -> str:
    if metric not in directions:
        return metric
    better = "lower" if directions[metric] == "minimize" else "higher"
    return f"{metric} ({better} is better)"


def grid(n_panels: int) -> tuple[int, int]:
    """(rows, columns) of the panels: at most three side by side."""
    cols = min(3, n_panels)
    return math.ceil(n_panels / cols), cols


def front(points: Sequence[Mapping[str, Any]], x: str, y: str) -> list[Mapping[str, Any]]:
    """The Pareto members in the order their line joins them."""
    return sorted((p for p in points if p.get("pareto")), key=lambda p: (p[x], p[y]))


def joins_front(panels: Sequence[tuple[str, str]]) -> bool:
    # In more than two dimensions a 2-D projection of the front is not a curve: join only
    # when the one panel shows the whole objective space.
    return len(panels) == 1 and panels[0][0] != "trial_id"


def layout(
    points: Sequence[Mapping[str, Any]], objectives: Sequence[tuple[str, str]]
) -> tuple[list[Mapping[str, Any]], list[tuple[str, str]], dict[str, str], list[str]]:
    """(drawable points, panels as (x, y) pairs, directions by metric, objective metrics)."""
    if not objectives:
        raise ValueError("objectives is empty: need at least one (metric, direction)")
    metrics = [metric for metric, _ in objectives]
    complete = [p for p in points if all(finite(p.get(m)) for m in metrics)]
    # One objective has no pair: plot it against the trial number instead.
    if len(metrics) == 1:
        panels = [("trial_id", metrics[0])]
    else:
        panels = list(itertools.combinations(metrics, 2))
    return complete, panels, dict(objectives), metrics
