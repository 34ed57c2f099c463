"""Fréchet Inception Distance with pytorch-fid's network, bounded memory, cached reference stats.

Input conventions (no guessing: a float image in [0, 1] is also in [-1, 1]):

- ``numpy.ndarray`` of dtype uint8, NHWC, values 0..255 (what
  ``binarydm.train._diffusion.to_uint8`` and the dataset loaders produce);
- ``torch.Tensor`` of a floating dtype, NCHW, with ``value_range=(low, high)``
  given explicitly, e.g. ``(-1, 1)`` for diffusion samples or ``(0, 1)``.

One-channel images (MNIST) are repeated to RGB. Every image is mapped to
``[0, 1]`` and handed to pytorch-fid's ``InceptionV3``, which resizes to 299x299
(bilinear) and rescales to ``[-1, 1]`` itself, so scores are pytorch-fid scores.

Memory stays flat in the number of images (benchmarks/results/fid_cpu.md):
features go into one preallocated numpy array, every forward runs under
``torch.inference_mode`` and with the same batch shape (the last batch is
padded), and nothing per image outlives its batch. On CPU the network runs in
channels_last layout (faster); on CUDA its convolutions run without TF32, so
CPU and GPU features agree to about 1e-5 relative.

A reference set's statistics and, for precision and recall
(``binarydm.metrics.precision_recall``), its features are cached per key
(name, dims, count); ``reference_statistics_and_features`` gets both with at
most one pass of the network.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_fid.inception import InceptionV3

from binarydm.metrics._inception_weights import ensure_fid_weights

FID_DIMS: tuple[int, ...] = tuple(sorted(InceptionV3.BLOCK_INDEX_BY_DIM))
Images = np.ndarray | torch.Tensor
Statistics = tuple[np.ndarray, np.ndarray]
_RANGE_SLACK = 0.1  # fraction of value_range tolerated outside it before refusing


class FIDScorer:
    """Inception features and their Gaussian statistics for one feature size and device.

    ``dims`` picks pytorch-fid's block: 64 (first max pool), 192 (second max
    pool), 768 (pre-aux classifier) or 2048 (final average pool, the FID of
    the literature); smaller blocks are average-pooled to a vector per image.
    ``channels_last`` (default: on for CPU) runs the network in NHWC layout,
    oneDNN's native one: 2-3x faster on CPU than NCHW, features within 2e-5.
    """

    def __init__(
        self,
        dims: int = 2048,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 50,
        allow_download: bool = True,
        channels_last: bool | None = None,
    ) -> None:
        if dims not in FID_DIMS:
            raise ValueError(f"dims={dims} is not an Inception feature size; use one of {FID_DIMS}")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        ensure_fid_weights(allow_download=allow_download)
        self.dims = dims
        self.batch_size = batch_size
        self.device = torch.device(device)
        block = InceptionV3.BLOCK_INDEX_BY_DIM[dims]
        if channels_last is None:
            channels_last = self.device.type == "cpu"
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        network = InceptionV3([block]).eval()
        self.network = network.to(self.device, memory_format=self.memory_format)

    def features(
        self, images: Images, *, value_range: tuple[float, float] | None = None
    ) -> np.ndarray:
        """(n, dims) float64 Inception features of ``images`` (conventions: module docstring)."""
        unit_images = _UnitImages(images, value_range)
        features = np.empty((len(unit_images), self.dims), dtype=np.float64)
        # One fixed batch shape, so an image's features never depend on how many
        # images share its batch; padding rows are scored and then dropped.
        batch = torch.zeros(
            (self.batch_size, 3, *unit_images.spatial_size), dtype=torch.float32, device=self.device
        ).contiguous(memory_format=self.memory_format)
        with torch.inference_mode(), _full_fp32_convolutions():
            for start in range(0, len(unit_images), self.batch_size):
                stop = min(start + self.batch_size, len(unit_images))
                batch[: stop - start] = unit_images.batch(start, stop, self.device)
                batch[stop - start :] = 0.0
                output = self.network(batch)[0]
                if output.shape[2:] != (1, 1):
                    output = F.adaptive_avg_pool2d(output, output_size=(1, 1))
                features[start:stop] = output[: stop - start].flatten(1).cpu().numpy()
        return features

    def activation_statistics(
        self, images: Images, *, value_range: tuple[float, float] | None = None
    ) -> Statistics:
        """Mean and covariance of the features, as pytorch-fid computes them."""
        require_nonsingular_covariance(len(images), self.dims)
        return feature_statistics(self.features(images, value_range=value_range))

    def fid(
        self,
        images: Images,
        reference: Statistics,
        *,
        value_range: tuple[float, float] | None = None,
    ) -> float:
        """FID of ``images`` against reference statistics ``(mu, sigma)`` of the same ``dims``."""
        mu, sigma = self.activation_statistics(images, value_range=value_range)
        return frechet_distance(mu, sigma, *reference)


def feature_statistics(features: np.ndarray) -> Statistics:
    """Mean and covariance of (n, dims) features, as pytorch-fid computes them."""
    require_nonsingular_covariance(*features.shape)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``tr(sqrtm(sigma1 sigma2))`` of two covariance (symmetric PSD) matrices, by two
    symmetric eigendecompositions instead of a general matrix square root.

    ``sigma1 sigma2`` is similar to ``S = sigma1^(1/2) sigma2 sigma1^(1/2)`` (symmetric
    PSD), so their eigenvalues agree and the trace of the product's principal square root
    is the sum of the square roots of ``S``'s eigenvalues. SciPy's ``sqrtm`` (pytorch-fid's
    way) takes a Schur decomposition of the non-symmetric product, the slowest part of a
    2048-d FID, about 5x this (benchmarks/results/fid_cpu.md, "The Fréchet distance at
    2048 dims"), and its rounding can leave an imaginary part. In float64, through torch's
    LAPACK; eigenvalues below zero are rounding of a PSD matrix's and count as zero.
    """
    # Copies: from_numpy refuses negative strides and warns on read-only arrays.
    first = torch.tensor(np.asarray(sigma1, dtype=np.float64))
    second = torch.tensor(np.asarray(sigma2, dtype=np.float64))
    eigenvalues, vectors = torch.linalg.eigh(first)
    root = (vectors * eigenvalues.clamp(min=0).sqrt()) @ vectors.T
    similar = root @ second @ root
    spectrum = torch.linalg.eigvalsh((similar + similar.T) / 2)
    return float(spectrum.clamp(min=0).sqrt().sum())


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Fréchet distance of two Gaussians, pytorch-fid's formula, as a Python float.

    ``||mu1 - mu2||^2 + tr(s1) + tr(s2) - 2 tr(sqrtm(s1 s2))``, the last term by
    ``trace_sqrt_product``. Not pytorch-fid's own function: version 0.3.0 calls
    ``sqrtm(..., disp=False)``, an argument SciPy deprecated in 1.16 and newer SciPy (the
    GPU image's) no longer takes, so every trial of a GPU study failed at FID with a
    TypeError; and its ``sqrtm`` of a 2048-d product took most of a GPU trial's FID time.
    tests/metrics/test_fid.py checks that the two agree where both run.
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"statistics of different feature sizes: mu {mu1.shape} vs {mu2.shape}, "
            f"sigma {sigma1.shape} vs {sigma2.shape}; compare equal fid dims only"
        )
    diff = mu1 - mu2
    covariance_term = trace_sqrt_product(sigma1, sigma2)
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * covariance_term)


def require_nonsingular_covariance(count: int, dims: int) -> None:
    """Refuse a sample count whose covariance cannot have full rank ``dims``."""
    if count > dims:
        return
    smaller = [d for d in FID_DIMS if d < count]
    alternative = (
        f"or use dims in {smaller}"
        if smaller
        else f"no feature size fits (smallest is {FID_DIMS[0]})"
    )
    raise ValueError(
        f"{count} images give a covariance of rank at most {count - 1}, so the "
        f"{dims}x{dims} covariance is singular and the FID meaningless; score at least "
        f"{dims + 1} images ({alternative})"
    )


def reference_statistics(
    name: str,
    images_fn: Callable[[], Images],
    dims: int,
    cache_dir: str | os.PathLike,
    *,
    count: int,
    scorer: FIDScorer | None = None,
    value_range: tuple[float, float] | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 50,
) -> Statistics:
    """``(mu, sigma)`` of a reference set, cached as a pytorch-fid compatible .npz.

    ``name`` says which images, e.g. ``"cifar10/test/32px"`` (dataset, split,
    resolution); the cache key adds ``dims`` and ``count``. ``images_fn`` is
    called only on a cache miss and must return exactly ``count`` images. Features
    of the same key cached by :func:`reference_features` give the statistics
    without calling ``images_fn`` or the network.
    """
    require_nonsingular_covariance(count, dims)
    path = reference_statistics_path(name, dims, count, cache_dir)
    cached = _load_statistics(path, name, dims, count)
    if cached is not None:
        return cached
    features = _load_features(
        reference_features_path(name, dims, count, cache_dir), name, dims, count
    )
    if features is None:
        images = _reference_images(name, images_fn, count)
        scorer = _reference_scorer(scorer, dims, device, batch_size)
        features = scorer.features(images, value_range=value_range)
    mu, sigma = feature_statistics(features)
    _save_statistics(path, mu, sigma, name, dims, count)
    return mu, sigma


def reference_features(
    name: str,
    images_fn: Callable[[], Images],
    dims: int,
    cache_dir: str | os.PathLike,
    *,
    count: int,
    scorer: FIDScorer | None = None,
    value_range: tuple[float, float] | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 50,
) -> np.ndarray:
    """(count, dims) float64 features of a reference set, cached beside its statistics.

    Same key and arguments as :func:`reference_statistics` (for precision and
    recall, which need the points and not only their Gaussian). The file stores
    float32, losslessly: the network computes in float32, so its float64
    features are float32 values (checked; other features are stored as float64),
    and a cache hit returns exactly what the miss did.
    """
    path = reference_features_path(name, dims, count, cache_dir)
    cached = _load_features(path, name, dims, count)
    if cached is not None:
        return cached
    images = _reference_images(name, images_fn, count)
    scorer = _reference_scorer(scorer, dims, device, batch_size)
    features = scorer.features(images, value_range=value_range)
    compact = features.astype(np.float32)
    if not np.array_equal(compact, features):
        compact = features
    _save_archive(path, name, dims, count, features=compact)
    return features


def reference_statistics_and_features(
    name: str,
    images_fn: Callable[[], Images],
    dims: int,
    cache_dir: str | os.PathLike,
    *,
    count: int,
    scorer: FIDScorer | None = None,
    value_range: tuple[float, float] | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 50,
) -> tuple[Statistics, np.ndarray]:
    """``((mu, sigma), features)`` of a reference set with at most one network pass.

    On a miss the features are computed (one call of ``images_fn``) and cached
    first, and the statistics come from them; either file is reused when present.
    """
    require_nonsingular_covariance(count, dims)
    options = dict(
        count=count, scorer=scorer, value_range=value_range, device=device, batch_size=batch_size
    )
    features = reference_features(name, images_fn, dims, cache_dir, **options)
    statistics = reference_statistics(name, images_fn, dims, cache_dir, **options)
    return statistics, features


def reference_statistics_path(
    name: str, dims: int, count: int, cache_dir: str | os.PathLike
) -> Path:
    """Cache file of one reference key; readable by ``python -m pytorch_fid``."""
    return _reference_path(name, dims, count, cache_dir, suffix="")


def reference_features_path(name: str, dims: int, count: int, cache_dir: str | os.PathLike) -> Path:
    """Cache file of one reference key's features, beside its statistics."""
    return _reference_path(name, dims, count, cache_dir, suffix="_features")


def _reference_path(name: str, dims: int, count: int, cache_dir, suffix: str) -> Path:
    key = f"{name}|dims={dims}|count={count}"
    # The readable part may collide ("a/b" and "a-b"); the checksum of the key does not.
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")
    checksum = f"{zlib.crc32(key.encode()):08x}"
    return Path(cache_dir) / "fid_stats" / f"{readable}_d{dims}_n{count}_{checksum}{suffix}.npz"


def _reference_images(name: str, images_fn: Callable[[], Images], count: int) -> Images:
    images = images_fn()
    if len(images) != count:
        raise ValueError(f"images_fn for {name!r} returned {len(images)} images, not count={count}")
    return images


def _reference_scorer(scorer: FIDScorer | None, dims: int, device, batch_size: int) -> FIDScorer:
    if scorer is None:
        return FIDScorer(dims, device=device, batch_size=batch_size)
    if scorer.dims != dims:
        raise ValueError(f"scorer has dims={scorer.dims}, reference asked for dims={dims}")
    return scorer


def _load_statistics(path: Path, name: str, dims: int, count: int) -> Statistics | None:
    stored = _load_archive(path, name, dims, count, "statistics", ("mu", "sigma"))
    return None if stored is None else (stored["mu"], stored["sigma"])


def _load_features(path: Path, name: str, dims: int, count: int) -> np.ndarray | None:
    stored = _load_archive(path, name, dims, count, "features", ("features",))
    if stored is None:
        return None
    features = stored["features"]
    if features.shape != (count, dims) or not np.isfinite(features).all():
        return None  # written by something else under the right key: computed again
    return features.astype(np.float64)


def _load_archive(
    path: Path, name: str, dims: int, count: int, what: str, fields: tuple[str, ...]
) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            stored = {key: archive[key] for key in ("name", "dims", "count", *fields)}
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile):
        return None  # damaged or foreign file: computed again and replaced
    found = (str(stored["name"]), int(stored["dims"]), int(stored["count"]))
    if found != (name, dims, count):
        raise ValueError(
            f"{path} holds {what} of {found[0]!r} (dims={found[1]}, count={found[2]}), "
            f"not {name!r} (dims={dims}, count={count})"
        )
    return stored


def _save_statistics(path: Path, mu, sigma, name: str, dims: int, count: int) -> None:
    _save_archive(path, name, dims, count, mu=mu, sigma=sigma)


def _save_archive(path: Path, name: str, dims: int, count: int, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Parallel trials may compute the same reference: each writes a private file
    # and the rename makes one whole file win.
    handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".partial")
    try:
        with os.fdopen(handle, "wb") as stream:
            np.savez(stream, name=name, dims=dims, count=count, **arrays)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _full_fp32_convolutions():
    """cuDNN convolutions without TF32 (on by default), so GPU features match CPU ones.

    Measured on an H200: with TF32 the features were 6e-4 (relative) off the
    CPU's, without it 3e-6; FIDs from CPU and GPU runs should be comparable.
    """
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = previous


class _UnitImages:
    """Images of either input convention, served batch by batch as NCHW RGB in [0, 1]."""

    def __init__(self, images: Images, value_range: tuple[float, float] | None) -> None:
        if isinstance(images, np.ndarray):
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3):
                raise ValueError(
                    f"numpy images must be uint8 NHWC with 1 or 3 channels, got "
                    f"{images.dtype} {images.shape}; pass floats as a torch NCHW tensor"
                )
            self.low, self.high = 0.0, 255.0
            self.nhwc = True
            self.spatial_size = images.shape[1:3]
        elif isinstance(images, torch.Tensor) and images.is_floating_point():
            if images.ndim != 4 or images.shape[1] not in (1, 3):
                raise ValueError(f"tensor images must be NCHW with 1 or 3 channels: {images.shape}")
            if value_range is None:
                raise ValueError(
                    "float images need value_range=(low, high): (-1, 1) for diffusion samples, "
                    "(0, 1) for ToTensor-style images"
                )
            self.low, self.high = float(value_range[0]), float(value_range[1])
            if not self.low < self.high:
                raise ValueError(f"value_range={value_range} must be (low, high) with low < high")
            self.nhwc = False
            self.spatial_size = tuple(images.shape[2:])
        else:
            raise ValueError(
                f"images must be a uint8 numpy NHWC array or a float torch NCHW tensor, "
                f"got {type(images).__name__} {getattr(images, 'dtype', '')}"
            )
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, start: int, stop: int, device: torch.device) -> torch.Tensor:
        chunk = self.images[start:stop]
        if self.nhwc:
            # A copy (a few KB a batch): from_numpy would warn on read-only arrays (np.load).
            chunk = torch.tensor(chunk).permute(0, 3, 1, 2)
        unit = (chunk.to(device, torch.float32) - self.low) / (self.high - self.low)
        # Unclamped samples overshoot a little and are clipped; far outside means
        # a wrong value_range, e.g. 0..255 floats declared as (0, 1).
        lowest, highest = unit.min().item(), unit.max().item()
        if lowest < -_RANGE_SLACK or highest > 1 + _RANGE_SLACK:
            span = self.high - self.low
            raise ValueError(
                f"images {start}..{stop - 1} span [{self.low + lowest * span:.3g}, "
                f"{self.low + highest * span:.3g}], far outside value_range=({self.low:g}, "
                f"{self.high:g}); pass the range the images really have"
            )
        return unit.clamp_(0.0, 1.0).expand(-1, 3, -1, -1)
