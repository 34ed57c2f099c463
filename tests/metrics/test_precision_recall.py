"""Improved precision and recall against a brute-force float64 reference; reference features cache.

The metric tests use random Gaussian features (no network). The cache tests use
a stand-in scorer whose features are a fixed function of the images, so the
number of network passes can be counted without Inception; tests/metrics/
test_fid.py checks the same cache with the real network.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from binarydm.metrics.fid import (
    feature_statistics,
    reference_features,
    reference_features_path,
    reference_statistics,
    reference_statistics_and_features,
    reference_statistics_path,
)
from binarydm.metrics.precision_recall import improved_precision_recall, knn_radii

# ---------------------------------------------------------------- reference


def brute_force_radii(points: np.ndarray, k: int) -> np.ndarray:
    """Distance to the k-th nearest other point, from the full (n, n) difference tensor."""
    distances = np.sqrt(((points[:, None, :] - points[None, :, :]) ** 2).sum(axis=2))
    np.fill_diagonal(distances, np.inf)
    return np.sort(distances, axis=1)[:, k - 1]


def brute_force_inside(samples: np.ndarray, manifold: np.ndarray, k: int) -> float:
    distances = np.sqrt(((samples[:, None, :] - manifold[None, :, :]) ** 2).sum(axis=2))
    return float((distances <= brute_force_radii(manifold, k)[None, :]).any(axis=1).mean())


def brute_force_precision_recall(real, fake, k):
    return brute_force_inside(fake, real, k), brute_force_inside(real, fake, k)


@pytest.fixture(scope="module")
def gaussians():
    """300 real and 250 fake 16-d points; the fake ones wider and shifted."""
    rng = np.random.default_rng(0)
    real = rng.normal(size=(300, 16))
    fake = 1.3 * rng.normal(size=(250, 16)) + 0.3
    return real, fake


# ---------------------------------------------------------------- (1) reference


@pytest.mark.parametrize(
    ("k", "expected"), [(1, (0.152, 0.87)), (3, (0.28, 0.96)), (5, (0.384, 0.98))]
)
def test_matches_brute_force_reference(gaussians, k, expected):
    real, fake = gaussians
    found = improved_precision_recall(real, fake, k)
    assert found == brute_force_precision_recall(real, fake, k)
    assert found == expected  # multiples of 1/250 and 1/300: no rounding in the fractions
    assert all(isinstance(value, float) for value in found)


def test_radii_match_brute_force_reference(gaussians):
    real, _ = gaussians
    np.testing.assert_allclose(knn_radii(real, 3), brute_force_radii(real, 3), rtol=1e-12)
    assert knn_radii(real, 3).dtype == np.float64


def test_ties_count_as_inside():
    # Integer coordinates: every distance is exact in float64, so ties are real ties.
    real = np.stack([np.arange(10.0), np.zeros(10)], axis=1)  # radius 1 each for k=1
    on_boundary = [[10.0, 0.0], [9.0, 1.0], [-1.0, 0.0]]  # exactly 1 from a real point
    outside = [[10.5, 0.0], [9.0, 1.5], [-2.0, 0.0]]
    fake = np.array(on_boundary + outside)
    assert knn_radii(real, 1).tolist() == [1.0] * 10
    precision, _ = improved_precision_recall(real, fake, 1)
    assert precision == 0.5
    assert brute_force_inside(fake, real, 1) == 0.5


def test_duplicated_points_tie_at_radius_zero():
    # Every point 4 times, so each k=3 radius is exactly 0 and a copy sits on the
    # boundary of each ball. Inception-like scale (2048-d, squared norms ~430):
    # there the expansion's rounding alone made half the radii nonzero.
    rng = np.random.default_rng(3)
    points = np.repeat(np.abs(0.35 + 0.3 * rng.normal(size=(100, 2048))), 4, axis=0)
    shuffled = points[rng.permutation(len(points))]
    assert (knn_radii(points) == 0).all()
    for batch_size in (77, 1024):
        assert improved_precision_recall(points, shuffled, batch_size=batch_size) == (1.0, 1.0)


# ---------------------------------------------------------------- (2) properties


def test_identical_sets_give_precision_and_recall_one(gaussians):
    real, _ = gaussians
    assert improved_precision_recall(real, real.copy()) == (1.0, 1.0)


def test_far_shifted_fake_set_gives_zero_and_zero(gaussians):
    real, fake = gaussians
    assert improved_precision_recall(real, fake + 100.0) == (0.0, 0.0)


def test_mode_collapse_gives_high_precision_and_low_recall(gaussians):
    real, _ = gaussians
    rng = np.random.default_rng(1)
    # Every generated sample a small perturbation of real point 0: realistic, no variety.
    collapsed = real[0] + 0.01 * rng.normal(size=(100, 16))
    precision, recall = improved_precision_recall(real, collapsed)
    assert brute_force_precision_recall(real, collapsed, 3) == (precision, recall)
    assert precision == 1.0  # all within real point 0's ball (radius 3.5)
    assert recall == 1 / 300  # only real point 0 lies inside the tiny fake balls


# ---------------------------------------------------------------- (3) chunking


@pytest.mark.parametrize("k", [3, 5])
def test_block_size_does_not_change_the_result(gaussians, k):
    real, fake = gaussians
    whole = improved_precision_recall(real, fake, k, batch_size=10_000)
    # 7 leaves ragged last blocks (300 = 42*7 + 6, 250 = 35*7 + 5); 4 gives blocks
    # narrower than k, so radii are merged across blocks.
    for batch_size in (7, 4):
        assert improved_precision_recall(real, fake, k, batch_size=batch_size) == whole
        np.testing.assert_allclose(
            knn_radii(real, k, batch_size=batch_size), knn_radii(real, k), rtol=1e-12
        )


def test_accepts_float32_arrays_and_tensors(gaussians):
    real, fake = gaussians
    real32, fake32 = real.astype(np.float32), fake.astype(np.float32)
    expected = brute_force_precision_recall(real32.astype(np.float64), fake32.astype(np.float64), 3)
    assert improved_precision_recall(real32, fake32) == expected
    assert improved_precision_recall(torch.from_numpy(real32), torch.from_numpy(fake32)) == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_agrees_with_cpu(gaussians):
    real, fake = gaussians
    assert improved_precision_recall(real, fake, device="cuda") == improved_precision_recall(
        real, fake
    )
    np.testing.assert_allclose(knn_radii(real, device="cuda"), knn_radii(real), rtol=1e-12)


# ---------------------------------------------------------------- (4) errors


def test_invalid_inputs_are_refused_with_their_sizes(gaussians):
    real, fake = gaussians
    with pytest.raises(ValueError, match="real_features have 16 dims, fake_features 15"):
        improved_precision_recall(real, fake[:, :15])
    with pytest.raises(ValueError, match=r"fake_features has 3 samples: .* at least 4"):
        improved_precision_recall(real, fake[:3])
    with pytest.raises(ValueError, match=r"real_features has 5 samples: the k=5 .* at least 6"):
        improved_precision_recall(real[:5], fake, k=5)
    with pytest.raises(ValueError, match=r"must be \(n, dims\), got shape \(16,\)"):
        improved_precision_recall(real[0], fake)
    with pytest.raises(ValueError, match="k=0 must be a positive integer"):
        improved_precision_recall(real, fake, k=0)
    with pytest.raises(ValueError, match="k=2.5"):
        improved_precision_recall(real, fake, k=2.5)
    with pytest.raises(ValueError, match="batch_size=0"):
        improved_precision_recall(real, fake, batch_size=0)
    broken = fake.copy()
    broken[3, 2] = np.nan
    with pytest.raises(ValueError, match="fake_features holds NaN"):
        improved_precision_recall(real, broken)
    with pytest.raises(ValueError, match=r"features has 0 samples"):
        knn_radii(np.empty((0, 16)))


# ---------------------------------------------------------------- (5) reference features cache


class CountingScorer:
    """Stands in for FIDScorer: float32-valued features, a fixed function of the images."""

    def __init__(self, dims: int, *, float32_values: bool = True) -> None:
        self.dims = dims
        self.float32_values = float32_values
        self.passes = 0

    def features(self, images, *, value_range=None) -> np.ndarray:
        self.passes += 1
        values = images.reshape(len(images), -1)[:, : self.dims]
        dtype = np.float32 if self.float32_values else np.float64
        return (values.astype(dtype) / 7).astype(np.float64)


@pytest.fixture
def reference_images():
    images = np.random.default_rng(2).integers(0, 256, size=(20, 4, 4, 3), dtype=np.uint8)
    calls = []

    def images_fn():
        calls.append(1)
        return images

    images_fn.calls = calls
    return images_fn


NAME, DIMS, COUNT = "toy/test/4px", 8, 20


def test_reference_features_round_trip_through_float32_file(reference_images, tmp_path):
    scorer = CountingScorer(DIMS)
    first = reference_features(NAME, reference_images, DIMS, tmp_path, count=COUNT, scorer=scorer)
    second = reference_features(NAME, reference_images, DIMS, tmp_path, count=COUNT, scorer=scorer)
    assert len(reference_images.calls) == scorer.passes == 1
    assert first.dtype == second.dtype == np.float64 and first.shape == (COUNT, DIMS)
    assert np.array_equal(first, second)
    assert np.array_equal(first, scorer.features(reference_images()))

    path = reference_features_path(NAME, DIMS, COUNT, tmp_path)
    assert path.parent == reference_statistics_path(NAME, DIMS, COUNT, tmp_path).parent
    assert path != reference_statistics_path(NAME, DIMS, COUNT, tmp_path)
    assert reference_features_path(NAME, DIMS, COUNT + 1, tmp_path) != path
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    with np.load(path) as archive:
        assert archive["features"].dtype == np.float32  # half the disk, no value lost


def test_reference_features_keep_float64_values_that_float32_would_round(
    reference_images, tmp_path
):
    scorer = CountingScorer(DIMS, float32_values=False)
    first = reference_features(NAME, reference_images, DIMS, tmp_path, count=COUNT, scorer=scorer)
    with np.load(reference_features_path(NAME, DIMS, COUNT, tmp_path)) as archive:
        assert archive["features"].dtype == np.float64
    again = reference_features(NAME, reference_images, DIMS, tmp_path, count=COUNT, scorer=scorer)
    assert np.array_equal(first, again) and scorer.passes == 1


def test_statistics_and_features_take_one_network_pass(reference_images, tmp_path):
    scorer = CountingScorer(DIMS)
    (mu, sigma), features = reference_statistics_and_features(
        NAME, reference_images, DIMS, tmp_path, count=COUNT, scorer=scorer
    )
    assert len(reference_images.calls) == scorer.passes == 1
    expected_mu, expected_sigma = feature_statistics(features)
    assert np.array_equal(mu, expected_mu) and np.array_equal(sigma, expected_sigma)

    # Both cached now: no images and no network, the same numbers.
    (mu2, sigma2), features2 = reference_statistics_and_features(
        NAME, reference_images, DIMS, tmp_path, count=COUNT, scorer=scorer
    )
    assert len(reference_images.calls) == scorer.passes == 1
    assert np.array_equal(mu2, mu) and np.array_equal(sigma2, sigma)
    assert np.array_equal(features2, features)

    # Statistics lost, features kept: the statistics come back from the features.
    reference_statistics_path(NAME, DIMS, COUNT, tmp_path).unlink()
    mu3, sigma3 = reference_statistics(
        NAME, reference_images, DIMS, tmp_path, count=COUNT, scorer=scorer
    )
    assert len(reference_images.calls) == scorer.passes == 1
    assert np.array_equal(mu3, mu) and np.array_equal(sigma3, sigma)


def test_statistics_cached_alone_cost_one_pass_for_the_features(reference_images, tmp_path):
    scorer = CountingScorer(DIMS)
    mu, sigma = reference_statistics(
        NAME, reference_images, DIMS, tmp_path, count=COUNT, scorer=scorer
    )
    # reference_statistics on its own writes only the statistics, as before.
    assert not reference_features_path(NAME, DIMS, COUNT, tmp_path).exists()
    (mu2, sigma2), _ = reference_statistics_and_features(
        NAME, reference_images, DIMS, tmp_path, count=COUNT, scorer=scorer
    )
    assert scorer.passes == 2  # one for the statistics earlier, one for the features now
    assert np.array_equal(mu2, mu) and np.array_equal(sigma2, sigma)


def test_damaged_features_file_is_recomputed(reference_images, tmp_path):
    scorer = CountingScorer(DIMS)
    first = reference_features(NAME, reference_images, DIMS, tmp_path, count=COUNT, scorer=scorer)
    path = reference_features_path(NAME, DIMS, COUNT, tmp_path)
    whole = path.read_bytes()
    path.write_bytes(whole[:100])  # truncated
    again = reference_features(NAME, reference_images, DIMS, tmp_path, count=COUNT, scorer=scorer)
    assert scorer.passes == 2 and np.array_equal(again, first)
    # Flipped bytes inside the array: the zip member's CRC-32 no longer matches.
    offset = whole.index(np.float32(first[0, 0]).tobytes())
    flipped = whole[:offset] + bytes(b ^ 0xFF for b in whole[offset : offset + 8])
    path.write_bytes(flipped + whole[offset + 8 :])
    again = reference_features(NAME, reference_images, DIMS, tmp_path, count=COUNT, scorer=scorer)
    assert scorer.passes == 3 and np.array_equal(again, first)


def test_features_file_of_another_key_is_refused(reference_images, tmp_path):
    scorer = CountingScorer(DIMS)
    reference_features(NAME, reference_images, DIMS, tmp_path, count=COUNT, scorer=scorer)
    other = reference_features_path("toy/train/4px", DIMS, COUNT, tmp_path)
    reference_features_path(NAME, DIMS, COUNT, tmp_path).rename(other)
    with pytest.raises(ValueError, match=r"holds features of 'toy/test/4px' \(dims=8, count=20\)"):
        reference_features("toy/train/4px", reference_images, DIMS, tmp_path, count=COUNT)
    with pytest.raises(ValueError, match="holds features of"):
        # The statistics would come from that file too: refused, not silently used.
        reference_statistics("toy/train/4px", reference_images, DIMS, tmp_path, count=COUNT)
    assert scorer.passes == 1


def test_reference_features_check_count_and_scorer(reference_images, tmp_path):
    with pytest.raises(ValueError, match="returned 20 images, not count=21"):
        reference_features(NAME, reference_images, DIMS, tmp_path, count=21)
    with pytest.raises(ValueError, match="scorer has dims=8, reference asked for dims=4"):
        reference_features(
            NAME, reference_images, 4, tmp_path, count=COUNT, scorer=CountingScorer(8)
        )
    # Statistics need more images than dims; precision and recall do not.
    with pytest.raises(ValueError, match="rank at most 19"):
        reference_statistics_and_features(
            NAME, reference_images, 64, tmp_path, count=COUNT, scorer=CountingScorer(64)
        )
    features = reference_features(
        NAME, reference_images, 32, tmp_path, count=COUNT, scorer=CountingScorer(32)
    )
    assert features.shape == (COUNT, 32)
