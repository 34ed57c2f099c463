"""Reading uint8 image arrays out of ``.npz`` files (a user's file, and the offline MNIST copy)."""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np

from binarydm.data._paths import DatasetError
from binarydm.data._split import DatasetSplit, subset_indices

# np.load of a damaged archive surfaces as any of these, depending on where the damage is.
NPZ_READ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


def image_key_candidates(split: str) -> tuple[str, ...]:
    return (f"x_{split}", f"{split}_images", f"images_{split}", "images", "x")


def label_key_candidates(split: str) -> tuple[str, ...]:
    return (f"y_{split}", f"{split}_labels", f"labels_{split}", "labels", "y")


def _pick_key(keys: list[str], explicit: str | None, candidates: tuple[str, ...]) -> str | None:
    if explicit is not None:
        return explicit if explicit in keys else None
    return next((key for key in candidates if key in keys), None)


def _as_nhwc(images: np.ndarray, path: Path, key: str) -> np.ndarray:
    if images.dtype != np.uint8:
        raise DatasetError(f"{path}: array {key!r} is {images.dtype}; expected uint8 images")
    if images.ndim == 3:
        return images[..., None]
    if images.ndim == 4 and images.shape[-1] in (1, 3):
        return images
    raise DatasetError(
        f"{path}: array {key!r} has shape {images.shape}; expected NHW or NHWC with 1 or 3 channels"
    )


def read_npz(
    path: Path,
    split: str,
    *,
    source: str = "npz",
    images_key: str | None = None,
    labels_key: str | None = None,
    limit: int | None = None,
    note: str = "",
) -> DatasetSplit:
    """One split of an ``.npz`` of uint8 images (NHW or NHWC), with optional labels.

    Keys default to the first present of ``x_{split}``, ``{split}_images``, ``images_{split}``,
    ``images``, ``x`` (labels: the same with ``y``/``labels``).
    """
    if not path.is_file():
        raise DatasetError(f"{source}: {path} not found")
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.files)
            image_key = _pick_key(keys, images_key, image_key_candidates(split))
            if image_key is None:
                wanted = images_key or " / ".join(image_key_candidates(split))
                raise DatasetError(f"{path}: no image array {wanted}; it holds {keys}")
            label_key = _pick_key(keys, labels_key, label_key_candidates(split))
            if labels_key is not None and label_key is None:
                raise DatasetError(f"{path}: no label array {labels_key!r}; it holds {keys}")
            images = _as_nhwc(archive[image_key], path, image_key)
            labels = archive[label_key] if label_key is not None else None
    except DatasetError:
        raise
    except NPZ_READ_ERRORS as error:
        raise DatasetError(f"{source}: {path} is not a readable .npz ({error})") from error
    if labels is not None and len(labels) != len(images):
        raise DatasetError(f"{path}: {len(labels)} labels for {len(images)} images")
    chosen = subset_indices(len(images), limit)
    if chosen is not None:
        images = images[chosen]
        labels = labels[chosen] if labels is not None else None
    return DatasetSplit(source, split, images, labels, str(path), note=note)
