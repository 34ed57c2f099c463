"""Named image sources: ``mnist``, ``cifar10``, ``npz`` and ``image-folder``, via ``load_split``.

MNIST and CIFAR-10 are read from the offline copies in the data root when present;
otherwise torchvision downloads the originals into the cache dir (``download=False``
or ``BINARYDM_OFFLINE=1`` use an earlier download only and fail fast).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import torchvision

from binarydm.data._cifar_jpeg import CIFAR10_JPEG_FILE, read_cifar10_jpeg
from binarydm.data._folder import read_image_folder
from binarydm.data._npz import read_npz
from binarydm.data._paths import (
    DatasetError,
    download_allowed,
    find_data_root,
    how_to_get_data,
)
from binarydm.data._paths import cache_dir as resolve_cache_dir
from binarydm.data._split import DatasetSplit, check_split, subset_indices

SOURCES = ("mnist", "cifar10", "npz", "image-folder")
MNIST_FILE = "mnist_uint8.npz"
MNIST_CLASSES = tuple(str(digit) for digit in range(10))
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
_OFFLINE_FILES = {"mnist": MNIST_FILE, "cifar10": CIFAR10_JPEG_FILE}
_TORCHVISION = {"mnist": torchvision.datasets.MNIST, "cifar10": torchvision.datasets.CIFAR10}
_CLASS_NAMES = {"mnist": MNIST_CLASSES, "cifar10": CIFAR10_CLASSES}


def _files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else set()


def _download(name: str, split: str, cache: Path, download: bool, tried: str) -> DatasetSplit:
    root = cache / "torchvision"
    existing = _files_under(root)
    try:
        dataset = _TORCHVISION[name](str(root), train=split == "train", download=download)
    except Exception as error:  # torchvision raises RuntimeError, URLError, OSError... alike
        # torchvision writes archives in place: drop what this failed attempt left behind.
        for partial in _files_under(root) - existing:
            partial.unlink(missing_ok=True)
        action = "download into" if download else "earlier download in"
        raise DatasetError(
            f"{name}: offline copy {tried}; torchvision {action} {root} failed ({error}). "
            + how_to_get_data(_OFFLINE_FILES[name])
        ) from error
    images = np.asarray(dataset.data, dtype=np.uint8)
    images = images[..., None] if images.ndim == 3 else images
    labels = np.asarray(dataset.targets, dtype=np.int64)
    return DatasetSplit(name, split, images, labels, str(root))


def _read_named(
    name: str,
    split: str,
    data_root: str | os.PathLike | None,
    cache: Path,
    limit: int | None,
    download: bool | None,
) -> DatasetSplit:
    root = find_data_root(data_root)
    offline = root / _OFFLINE_FILES[name] if root is not None else None
    if offline is not None and offline.is_file():
        try:
            if name == "cifar10":
                loaded = read_cifar10_jpeg(offline, split, cache, limit)
            else:
                loaded = read_npz(offline, split, source=name, limit=limit)
        except DatasetError as error:
            raise DatasetError(f"{error}. {how_to_get_data(offline.name)}") from error
    else:
        tried = f"{offline} not found" if offline is not None else "not found (no data root)"
        loaded = _download(name, split, cache, download_allowed(download), tried)
        chosen = subset_indices(loaded.num_images, limit)
        if chosen is not None:
            loaded = dataclasses.replace(
                loaded, images=loaded.images[chosen], labels=loaded.labels[chosen]
            )
    return dataclasses.replace(loaded, class_names=_CLASS_NAMES[name])


def _user_path(
    source: str, path: str | os.PathLike | None, data_root: str | os.PathLike | None
) -> Path:
    """``path`` against the cwd, else against the data root (a study file may name either)."""
    if path is None:
        raise DatasetError(f"{source}: pass path= (the user's .npz file or image folder)")
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate.resolve()
    root = find_data_root(data_root)
    if root is not None and (root / candidate).exists():
        return root / candidate
    where = f"{candidate.resolve()}" + (f" or {root / candidate}" if root is not None else "")
    raise DatasetError(f"{source}: {where} not found")


def load_split(
    source: str,
    split: str = "train",
    *,
    data_root: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    path: str | os.PathLike | None = None,
    images_key: str | None = None,
    labels_key: str | None = None,
    image_size: int | None = None,
    download: bool | None = None,
) -> DatasetSplit:
    """Images of ``split`` ("train"/"test") of a named source, as stored (uint8 NHWC).

    ``limit`` keeps a fixed seeded subset (see ``subset_indices``). ``path``,
    ``images_key``/``labels_key`` serve ``npz``; ``path`` and ``image_size`` serve
    ``image-folder``. Every failure to find or parse the data is a ``DatasetError``.
    """
    check_split(split)
    cache = resolve_cache_dir(cache_dir)
    if source in _OFFLINE_FILES:
        return _read_named(source, split, data_root, cache, limit, download)
    if source == "npz":
        file = _user_path(source, path, data_root)
        return read_npz(file, split, images_key=images_key, labels_key=labels_key, limit=limit)
    if source == "image-folder":
        folder = _user_path(source, path, data_root)
        return read_image_folder(folder, split, image_size=image_size, limit=limit)
    raise DatasetError(f"source={source!r} is unknown: allowed {SOURCES}")
