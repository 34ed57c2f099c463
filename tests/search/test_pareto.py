"""Pareto fronts and hypervolumes against hand-computed values, an exact cell count and Optuna."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from binarydm.search._pareto import (
    default_reference_point,
    hypervolume,
    hypervolume_history,
    pareto_front,
)

MIN2 = ["minimize", "minimize"]
MIN3 = ["minimize"] * 3


def test_front_2d_hand_computed() -> None:
    points = [[1, 5], [2, 3], [3, 4], [4, 1], [5, 5], [2, 3]]
    # (3,4) is dominated by (2,3); (5,5) by everything; the duplicate (2,3) keeps both copies.
    assert pareto_front(points, MIN2).tolist() == [True, True, False, True, False, True]


def test_front_respects_maximize() -> None:
    points = [[1.0, 10.0], [2.0, 20.0], [0.5, 5.0]]
    assert pareto_front(points, ["minimize", "maximize"]).tolist() == [True, True, True]
    assert pareto_front(points, ["maximize", "maximize"]).tolist() == [False, True, False]
    assert pareto_front(points, ["minimize", "minimize"]).tolist() == [False, False, True]


def test_front_weakly_dominated_point_is_off() -> None:
    # Equal in one objective, worse in the other: dominated.
    assert pareto_front([[1, 1, 1], [1, 1, 2]], MIN3).tolist() == [True, False]


def test_front_ignores_rows_with_nan() -> None:
    points = [[np.nan, 0.0], [1.0, 1.0], [2.0, 2.0]]
    assert pareto_front(points, MIN2).tolist() == [False, True, False]


def test_front_of_nothing() -> None:
    assert pareto_front([], MIN3).shape == (0,)


def test_bad_direction_and_shape_are_errors() -> None:
    with pytest.raises(ValueError, match="direction='min' is invalid"):
        pareto_front([[1, 2]], ["min", "minimize"])
    with pytest.raises(ValueError, match=r"shape \(1, 3\) do not match 2"):
        hypervolume([[1, 2, 3]], [4, 4], MIN2)


def test_hypervolume_single_point_is_box() -> None:
    assert hypervolume([[1.0, 2.0, 0.5]], [3.0, 5.0, 2.0], MIN3) == pytest.approx(2 * 3 * 1.5)
    assert hypervolume([[1.0, 2.0]], [4.0, 4.0], MIN2) == pytest.approx(6.0)


def test_hypervolume_overlapping_boxes_hand_computed() -> None:
    # 2-D: boxes 2x1 and 1x2 overlap in a 1x1 square.
    assert hypervolume([[1, 2], [2, 1]], [3, 3], MIN2) == pytest.approx(3.0)
    # 3-D: 2x1x1 + 1x2x1 - 1x1x1.
    assert hypervolume([[0, 1, 1], [1, 0, 1]], [2, 2, 2], MIN3) == pytest.approx(3.0)
    # Adding a dominated point or a duplicate changes nothing.
    assert hypervolume([[0, 1, 1], [1, 0, 1], [1, 1, 1.5], [0, 1, 1]], [2, 2, 2], MIN3) == (
        pytest.approx(3.0)
    )


def test_hypervolume_ignores_points_outside_reference() -> None:
    assert hypervolume([[1, 1], [5, 0]], [3, 3], MIN2) == pytest.approx(4.0)
    assert hypervolume([[3, 1]], [3, 3], MIN2) == 0.0  # on the boundary: no box
    assert hypervolume([], [3, 3], MIN2) == 0.0


def test_hypervolume_maximize_mirrors_minimize() -> None:
    rng = np.random.default_rng(1)
    points = rng.uniform(0, 1, size=(12, 3))
    directions = ["minimize", "maximize", "maximize"]
    flipped = points * np.array([1, -1, -1])
    expected = hypervolume(flipped, [1.0, 0.0, 0.0], MIN3)
    assert hypervolume(points, [1.0, 0.0, 0.0], directions) == pytest.approx(expected)


def _cell_count(points: np.ndarray, reference: int) -> int:
    """Exact hypervolume of integer points: the unit cells whose centre some point dominates."""
    m = points.shape[1]
    centres = np.array(list(itertools.product(*[np.arange(reference) + 0.5] * m)))
    covered = (points[None, :, :] <= centres[:, None, :]).all(axis=-1).any(axis=1)
    return int(covered.sum())


@pytest.mark.parametrize(("m", "n", "seed"), [(2, 15, 0), (3, 12, 1), (3, 30, 2), (4, 10, 3)])
def test_hypervolume_equals_exact_cell_count(m: int, n: int, seed: int) -> None:
    reference = 8
    points = np.random.default_rng(seed).integers(0, reference, size=(n, m)).astype(float)
    expected = _cell_count(points, reference)
    assert hypervolume(points, [reference] * m, ["minimize"] * m) == pytest.approx(expected)


def test_hypervolume_matches_monte_carlo_for_real_valued_points() -> None:
    rng = np.random.default_rng(7)
    points = rng.uniform(0, 1, size=(10, 3))
    samples = rng.uniform(0, 1.2, size=(200_000, 3))
    covered = np.zeros(len(samples), dtype=bool)
    for point in points:
        covered |= (samples >= point).all(axis=1)
    estimate = covered.mean() * 1.2**3
    assert hypervolume(points, [1.2, 1.2, 1.2], MIN3) == pytest.approx(estimate, rel=0.02)


@pytest.mark.parametrize(("m", "seed"), [(2, 0), (3, 1), (4, 2), (5, 3)])
def test_hypervolume_matches_optuna(m: int, seed: int) -> None:
    hv_module = pytest.importorskip("optuna._hypervolume")
    compute = getattr(hv_module, "compute_hypervolume", None)
    if compute is None:
        pytest.skip("optuna._hypervolume.compute_hypervolume is gone (private API)")
    points = np.random.default_rng(seed).uniform(0, 1, size=(14, m))
    reference = np.full(m, 1.1)
    assert hypervolume(points, reference, ["minimize"] * m) == pytest.approx(
        compute(points, reference)
    )


def test_default_reference_point_minimize_is_1_1_x_worst() -> None:
    points = [[10.0, 2.0], [20.0, 1.0]]
    np.testing.assert_allclose(default_reference_point(points, MIN2), [22.0, 2.2])


def test_default_reference_point_maximize_mirrors() -> None:
    # Savings (maximised): the mirror of 1.1 x worst is 0.9 x the smallest.
    points = [[10.0, 4.0], [20.0, 8.0]]
    reference = default_reference_point(points, ["minimize", "maximize"])
    np.testing.assert_allclose(reference, [22.0, 3.6])
    assert hypervolume(points, reference, ["minimize", "maximize"]) > 0


def test_default_reference_point_zero_and_constant_objectives() -> None:
    # Worst 0: the margin comes from the spread (0.1 x 4); constant 0: the margin is 0.1.
    points = [[-4.0, 0.0], [0.0, 0.0]]
    np.testing.assert_allclose(default_reference_point(points, MIN2), [0.4, 0.1])


def test_default_reference_point_skips_non_finite_rows() -> None:
    points = [[1.0, np.inf], [2.0, 3.0], [np.nan, 1.0]]
    np.testing.assert_allclose(default_reference_point(points, MIN2), [2.2, 3.3])
    with pytest.raises(ValueError, match="no finite objective values"):
        default_reference_point([[np.nan, 1.0]], MIN2)
    with pytest.raises(ValueError, match="factor=1.0 is invalid"):
        default_reference_point([[1.0, 1.0]], MIN2, factor=1.0)


def test_hypervolume_history_hand_computed() -> None:
    """Boxes against reference (4, 4): (1, 3) alone is 3; (3, 1) adds 3 minus their
    overlap 1 (total 5); (2, 2) then adds the 1x1 square between them (total 6); a
    dominated point finishing last adds nothing."""
    points = [[3, 1], [1, 3], [2, 2], [3, 3]]
    history = hypervolume_history(points, [20.0, 10.0, 30.0, 40.0], [4, 4], ["minimize"] * 2)
    assert history == [(10.0, 3.0), (20.0, 5.0), (30.0, 6.0), (40.0, 6.0)]


def test_hypervolume_history_counts_ties_together_and_needs_one_time_per_point() -> None:
    history = hypervolume_history([[1, 3], [3, 1]], [5.0, 5.0], [4, 4], ["minimize"] * 2)
    assert history == [(5.0, 5.0)]
    assert hypervolume_history(np.zeros((0, 2)), [], [4, 4], ["minimize"] * 2) == []
    with pytest.raises(ValueError, match="2 points but 1 finishing times"):
        hypervolume_history([[1, 3], [3, 1]], [5.0], [4, 4], ["minimize"] * 2)
