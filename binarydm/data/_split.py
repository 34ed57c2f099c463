"""``DatasetSplit``: the images of one split exactly as read, with labels, provenance and hash.

Everything downstream (resizing, tensors, FID references) starts from this object,
and its ``sha256`` is what a run logs as "the dataset as read".
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np

SPLITS = ("train", "test")
SUBSET_SEED = 0


@dataclass(frozen=True, eq=False)
class DatasetSplit:
    """uint8 NHWC images of one split of a named source.

    ``jpeg_compressed`` and ``note`` travel into FID reports: an FID against a lossy
    copy is only comparable with FIDs computed against the same copy.
    """

    source: str
    split: str
    images: np.ndarray
    labels: np.ndarray | None
    origin: str
    jpeg_compressed: bool = False
    note: str = ""
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        images = self.images
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(
                f"images must be uint8 NHWC with 1 or 3 channels, got {images.dtype} "
                f"{images.shape} from {self.origin}"
            )
        if self.labels is not None and len(self.labels) != len(images):
            raise ValueError(
                f"{len(self.labels)} labels for {len(images)} images from {self.origin}"
            )

    @cached_property
    def sha256(self) -> str:
        """sha256 of shape, dtype and bytes of ``images``; computed once per object."""
        digest = hashlib.sha256(f"{self.images.shape}|{self.images.dtype}|".encode())
        digest.update(np.ascontiguousarray(self.images).data)
        return digest.hexdigest()

    @property
    def num_images(self) -> int:
        return int(self.images.shape[0])

    @property
    def channels(self) -> int:
        return int(self.images.shape[-1])

    @property
    def resolution(self) -> tuple[int, int]:
        """(height, width) as stored."""
        return int(self.images.shape[1]), int(self.images.shape[2])

    def run_params(self) -> dict[str, str | int | bool]:
        """Flat reproducibility params for a run: what was read, from where, and its hash."""
        return {
            "dataset": self.source,
            "dataset_split": self.split,
            "dataset_images": self.num_images,
            "dataset_sha256": self.sha256,
            "dataset_origin": self.origin,
            "dataset_jpeg_compressed": self.jpeg_compressed,
            "dataset_note": self.note,
        }


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is invalid: allowed {SPLITS}")


def subset_indices(count: int, limit: int | None) -> np.ndarray | None:
    """Indices of a fixed ``limit``-image subset in stored order, or None for all images.

    A seeded random subset rather than the first ``limit``: the offline CIFAR-10 is
    sorted by class, and its first 1000 images would all be airplanes.
    """
    if limit is None or limit >= count:
        return None
    if limit <= 0:
        raise ValueError(f"limit={limit} is invalid: allowed a positive number of images")
    chosen = np.random.default_rng(SUBSET_SEED).choice(count, size=limit, replace=False)
    return np.sort(chosen)
