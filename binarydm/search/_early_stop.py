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
2. within the front, ``ranking: nsga2`` (the default): NSGA-II crowding distance (larger
   first: keeps the front spread; each objective's two extremes come first), then
3. the proxy (better first),
4. arrival order at the rung (earlier first: a newcomer must beat the incumbents);

or ``ranking: epsnet``: the front's epsilon-net (the paper's other ranking, from Salinas et
al. 2021): its best-proxy point first, then greedily the point farthest from those
already ranked (ties: arrival). The distances are taken in objectives scaled to [0, 1]
over all the rung's points, this project's choice (Syne Tune's epsilon-net takes raw
values): the proxy and the costs have unrelated units. A dominated trial can so move a
front's order, as it moves the scale.
Under crowding distance a front's worst-proxy point is an extreme, ranked first with the
best; the epsilon-net puts the best proxy first and spreads from there.

Otherwise the scheduler answers STOP. A trial is never revisited: as in ASHA a trial
kept early is not stopped later at the same rung. ``was_pruned`` tells, from a trial's
last result alone, that the scheduler stopped it: the searcher records it PRUNED in
Optuna and ``PrunedRunRecorder`` ends its MLflow run KILLED with tag ``state=PRUNED``.
"""

from __future__ import annotations

import math
from typing import Any, get_args

import numpy as np
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from binarydm.metric_contract import PROXY_METRICS, PROXY_TIMINGS, RUNG, RUNG_STEP
from binarydm.spec._early_stopping import Ranking

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


def epsilon_net_order(points: np.ndarray) -> list[int]:
    """Indices of ``points`` (one front, already scaled) in epsilon-net order: the lowest
    column 0 (the proxy) first, then each time the point whose distance to the nearest
    point taken so far is largest; ties go to the earlier row."""
    left = list(range(len(points)))
    first = min(left, key=lambda i: (points[i, 0], i))
    order = [first]
    left.remove(first)
    nearest = np.linalg.norm(points - points[first], axis=1)
    while left:
        # Largest distance first; on equal distances the earlier row (max keeps the first).
        pick = max(left, key=lambda i: (nearest[i], -i))
        order.append(pick)
        left.remove(pick)
        nearest = np.minimum(nearest, np.linalg.norm(points - points[pick], axis=1))
    return order


def _scaled(points: np.ndarray) -> np.ndarray:
    """Each objective mapped to [0, 1] over ``points`` (a constant one to 0): distances
    then weigh the proxy and the costs alike, whatever their units."""
    low, span = points.min(axis=0), np.ptp(points, axis=0)
    return (points - low) / np.where(span > 0, span, 1.0)


#: The within-front rankings ``search.early_stopping.ranking`` names.
RANKINGS = get_args(Ranking)


def rung_order(points: np.ndarray, ranking: str = "nsga2") -> list[int]:
    """Indices of minimised ``points`` (rows in arrival order, column 0 the proxy), best
    first: front, then within it ``nsga2`` (crowding distance, larger first, then proxy,
    then arrival) or ``epsnet`` (``epsilon_net_order`` of the scaled points)."""
    if ranking not in RANKINGS:
        raise ValueError(f"ranking={ranking!r} is invalid: allowed one of {list(RANKINGS)}")
    scaled = _scaled(points) if ranking == "epsnet" and len(points) else points
    order: list[int] = []
    for front in non_dominated_fronts(points):
        if ranking == "epsnet":
            order += [front[i] for i in epsilon_net_order(scaled[front])]
            continue
        crowding = crowding_distance(points[front])
        ranked = sorted(
            range(len(front)), key=lambda i: (-crowding[i], points[front[i], 0], front[i])
        )
        order += [front[i] for i in ranked]
    return order


def survivors(points: np.ndarray, reduction_factor: int, ranking: str = "nsga2") -> set[int]:
    """Which of the ``n`` recorded points continue: the ``ceil(n / eta)`` first."""
    keep = math.ceil(len(points) / reduction_factor)
    return set(rung_order(points, ranking)[:keep])


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
        ranking: str = "nsga2",
    ) -> None:
        super().__init__()
        if ranking not in RANKINGS:
            raise ValueError(f"ranking={ranking!r} is invalid: allowed one of {list(RANKINGS)}")
        self.proxy = proxy  # the rung metric ranked (minimised): proxy/test_loss or proxy/fid
        self.ranking = ranking
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
        points = np.array(list(recorded.values()), dtype=float)
        kept = survivors(points, self.reduction_factor, self.ranking)
        decision = TrialScheduler.CONTINUE if ids.index(trial_id) in kept else TrialScheduler.STOP
        self.decisions[trial_id] = (rung, decision)
        return decision

    def debug_string(self) -> str:
        stopped = sum(d == TrialScheduler.STOP for _, d in self.decisions.values())
        return (
            f"MO-ASHA (eta={self.reduction_factor}, {self.ranking}): {stopped} trials "
            "stopped at a rung"
        )
