"""Decoding the offline JPEG copy of CIFAR-10 once, and caching the decoded uint8 array.

The cache file name carries the CRC32s of the archive members it was decoded from
(read from the zip directory, without reading the 55 MB of data), so a changed copy
never reuses a stale decode, and a second process loads the cached array in well
under a second.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from binarydm.data._npz import NPZ_READ_ERRORS
from binarydm.data._paths import DatasetError, atomic_save_npy
from binarydm.data._split import DatasetSplit, subset_indices

CIFAR10_JPEG_FILE = "cifar10_jpeg_bytes.npz"
CIFAR10_SHAPE = (32, 32, 3)
CIFAR10_JPEG_NOTE = (
    "CIFAR-10 read from the offline JPEG copy (quality about 75, sorted by class): FIDs are "
    "comparable only with FIDs whose reference statistics come from this same decoded copy, "
    "not with published CIFAR-10 FIDs."
)
_DECODE_VERSION = 1  # bump when decoding changes, so old caches are not reused


def _members(split: str) -> tuple[str, str, str]:
    return f"{split}_jpeg", f"{split}_offsets", f"{split}_labels"


def _archive_key(path: Path, split: str) -> str:
    with zipfile.ZipFile(path) as archive:
        infos = {info.filename: info for info in archive.infolist()}
    digest = hashlib.sha256(f"v{_DECODE_VERSION}".encode())
    for member in _members(split):
        info = infos.get(f"{member}.npy")
        if info is None:
            raise DatasetError(f"{path}: member {member!r} is missing; it holds {sorted(infos)}")
        digest.update(f"|{member}:{info.CRC}:{info.file_size}".encode())
    return digest.hexdigest()[:16]


def _decode(blob: np.ndarray, offsets: np.ndarray, indices: np.ndarray, path: Path) -> np.ndarray:
    images = np.empty((len(indices), *CIFAR10_SHAPE), dtype=np.uint8)
    for row, index in enumerate(indices):
        start, stop = int(offsets[index]), int(offsets[index + 1])
        try:
            with Image.open(io.BytesIO(blob[start:stop].tobytes())) as image:
                images[row] = np.asarray(image.convert("RGB"))
        except (OSError, ValueError) as error:
            raise DatasetError(f"{path}: image {index} does not decode ({error})") from error
    return images


def _load_cached(cache_file: Path, count: int) -> np.ndarray | None:
    """The cached decode, or None when absent or unreadable (then it is decoded again)."""
    if not cache_file.is_file():
        return None
    try:
        images = np.load(cache_file, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if images.dtype != np.uint8 or images.shape != (count, *CIFAR10_SHAPE):
        return None
    return images


def read_cifar10_jpeg(path: Path, split: str, cache_root: Path, limit: int | None) -> DatasetSplit:
    """One split of the offline CIFAR-10 copy, decoded (or loaded from the decode cache)."""
    try:
        key = _archive_key(path, split)
        with np.load(path, allow_pickle=False) as archive:
            jpeg_name, offsets_name, labels_name = _members(split)
            offsets = archive[offsets_name]
            labels = archive[labels_name]
            count = len(offsets) - 1
            indices = subset_indices(count, limit)
            indices = np.arange(count) if indices is None else indices
            size = "all" if len(indices) == count else str(len(indices))
            cache_file = cache_root / "cifar10" / f"{split}-{size}-{key}.npy"
            images = _load_cached(cache_file, len(indices))
            decoded = images is None
            if decoded:
                images = _decode(archive[jpeg_name], offsets, indices, path)
    except DatasetError:
        raise
    except NPZ_READ_ERRORS as error:
        raise DatasetError(f"cifar10: {path} is not a readable .npz ({error})") from error
    if len(labels) != count:
        raise DatasetError(f"{path}: {len(labels)} labels for {count} images")
    if decoded:
        atomic_save_npy(cache_file, images)
    return DatasetSplit(
        "cifar10",
        split,
        images,
        labels[indices],
        str(path),
        jpeg_compressed=True,
        note=CIFAR10_JPEG_NOTE,
    )
