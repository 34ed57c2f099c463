"""Multi-objective early stopping of a study's trials: MO-ASHA as a Ray Tune scheduler.

``search.early_stopping`` (``binarydm.spec.EarlyStoppingSpec``) makes the first seed of
every trial report, at each rung step, its proxy (``proxy/test_loss``, or a small FID
``proxy/fid`` under ``proxy: fid``) beside the cost
objectives (``ops_g``, ``size_mib``...: fixed by the configuration, so already exact).
``MOASHAScheduler`` is asynchronous successive halving over those points (Schmucker et
al. 2021, "Multi-objective Asynchronous Successive Halving", with its NSGA-II ranking):
a trial reaching rung ``r`` joins the ``n`` trials recorded there and continues only if
it is among the ``ceil(n / eta)`` first by

1. non-dominated sorting (front 0 first),
2. NSGA-II crowding distance within the front (larger first: keeps the front spread),
3. the proxy (better first),
4. arrival order at the rung (earlier first: a newcomer must beat the incumbents).

Otherwise the scheduler answers STOP. A trial is never revisited: as in ASHA a trial
kept early is not stopped later at the same rung. ``was_pruned`` tells, from a trial's
last result alone, that the scheduler stopped it: the searcher records it PRUNED in
Optuna and ``PrunedRunRecorder`` ends its MLflow run KILLED with tag ``state=PRUNED``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from binarydm.metric_contract import PROXY_METRICS, PROXY_TIMINGS, RUNG, RUNG_STEP

#: The Optuna user attr / MLflow tag values of a stopped trial.
PRUNED_STATE = "PRUNED"


def dominates(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether minimised point ``a`` is no worse than ``b`` everywhere and better somewhere."""
    return bool(np.all(a <= b) and np.any(a < b))


def non_dominated_fronts(points: np.ndarray) -> list[list[int]]:
    """Indices of ``points`` (all minimised) by front: front 0 is non-dominated, etc."""
    n = len(points)
    dominated_by = [[j for j in range(n) if dominates(points[j], points[i])] for i in range(n)]
    left, fronts = set(range(n)), []
    while left:
        front = [i for i in sorted(left) if not any(j in left for j in dominated_by[i])]
        fronts.append(front)
        left -= set(front)
    return fronts


def crowding_distance(points: np.ndarray) -> np.ndarray:
    """NSGA-II crowding distance of each point of one front (boundary points: infinite)."""
    n, m = points.shape
    distance = np.zeros(n)
    if n <= 2:
        return np.full(n, np.inf)
    for k in range(m):
        order = np.argsort(points[:, k], kind="stable")
        span = points[order[-1], k] - points[order[0], k]
        if span <= 0:
            continue  # equal in this objective: no point is a boundary of it
        distance[order[0]] = distance[order[-1]] = np.inf
        gaps = (points[order[2:], k] - points[order[:-2], k]) / span
        distance[order[1:-1]] += gaps
    return distance


def rung_order(points: np.ndarray) -> list[int]:
    """Indices of minimised ``points`` (rows in arrival order, column 0 the proxy), best
    first: front, then crowding distance (larger first), then proxy, then arrival."""
    order: list[int] = []
    for front in non_dominated_fronts(points):
        crowding = crowding_distance(points[front])
        ranked = sorted(
            range(len(front)), key=lambda i: (-crowding[i], points[front[i], 0], front[i])
        )
        order += [front[i] for i in ranked]
    return order


def survivors(points: np.ndarray, reduction_factor: int) -> set[int]:
    """Which of the ``n`` recorded points continue: the ``ceil(n / eta)`` first."""
    keep = math.ceil(len(points) / reduction_factor)
    return set(rung_order(points)[:keep])


def was_pruned(result: dict[str, Any] | None) -> bool:
    """Whether a trial whose last result is ``result`` was stopped at a rung.

    The scheduler stops a trial on its rung report, and Tune ignores what came after:
    a trial that ends on a rung report (not the trainable's ``final`` one) was pruned.
    """
    return bool(result) and RUNG in result and not result.get("final") and not result.get("error")


def rung_values(result: dict[str, Any], costs: list[str]) -> dict[str, float]:
    """The rung's proxy (and its seconds), costs, index and step from a rung result (what
    is recorded)."""
    keys = [*PROXY_METRICS, *PROXY_TIMINGS, *costs, RUNG, RUNG_STEP]
    return {k: float(result[k]) for k in keys if isinstance(result.get(k), int | float)}


class MOASHAScheduler(FIFOScheduler):
    """MO-ASHA over (proxy, cost objectives) at the rungs trials report (see the module).

    ``costs``: the study's cost objectives with their directions (``minimize`` or
    ``maximize``); the proxy is minimised. A rung result without a finite proxy (a
    worker of rank > 0 never sends one; a non-finite loss stops the trial itself) is not
    recorded and continues.
    """

    def __init__(
        self,
        costs: list[tuple[str, str]],
        reduction_factor: int,
        proxy: str = PROXY_METRICS[0],
    ) -> None:
        super().__init__()
        self.proxy = proxy  # the rung metric ranked (minimised): proxy/test_loss or proxy/fid
        self.costs = list(costs)
        self.reduction_factor = int(reduction_factor)
        # rung -> {trial_id: minimised point}, in arrival order.
        self.recorded: dict[int, dict[str, list[float]]] = {}
        self.decisions: dict[str, tuple[int, str]] = {}

    def _point(self, result: dict[str, Any]) -> list[float] | None:
        values = [result.get(self.proxy), *(result.get(m) for m, _ in self.costs)]
        if not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
            return None
        signs = [1.0] + [1.0 if d == "minimize" else -1.0 for _, d in self.costs]
        return [s * float(v) for s, v in zip(signs, values, strict=True)]

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if RUNG not in result or result.get("final"):
            return TrialScheduler.CONTINUE
        point = self._point(result)
        if point is None:
            return TrialScheduler.CONTINUE
        return self.decide(trial.trial_id, int(result[RUNG]), point)

    def decide(self, trial_id: str, rung: int, point: list[float]) -> str:
        """Record ``point`` (minimised) of ``trial_id`` at ``rung``; CONTINUE or STOP."""
        recorded = self.recorded.setdefault(rung, {})
        recorded.setdefault(trial_id, point)
        ids = list(recorded)
        kept = survivors(np.array(list(recorded.values()), dtype=float), self.reduction_factor)
        decision = TrialScheduler.CONTINUE if ids.index(trial_id) in kept else TrialScheduler.STOP
        self.decisions[trial_id] = (rung, decision)
        return decision

    def debug_string(self) -> str:
        stopped = sum(d == TrialScheduler.STOP for _, d in self.decisions.values())
        return f"MO-ASHA (eta={self.reduction_factor}): {stopped} trials stopped at a rung"
