"""Reading a user's folder of images (flat, or one subfolder per class) with PIL.

Layout: ``ROOT/{split}/...`` when that folder exists, else ``ROOT/...`` for every split.
With class subfolders the labels are their sorted indices (torchvision's ImageFolder
convention); loose files are then ignored, as ImageFolder does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from binarydm.data._paths import DatasetError
from binarydm.data._split import DatasetSplit, subset_indices

_GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "F")


def _list_files(root: Path) -> tuple[list[tuple[str, int]], tuple[str, ...]]:
    has_class_dirs = any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir())
    if has_class_dirs:
        classes, class_to_idx = find_classes(root)
        files = make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
        return files, tuple(classes)
    files = sorted(
        str(p) for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS
    )
    return [(name, -1) for name in files], ()


def _read_image(path: str, image_size: int | None) -> np.ndarray:
    try:
        with Image.open(path) as image:
            mode = "L" if image.mode in _GRAYSCALE_MODES else "RGB"
            converted = image.convert(mode)
    except (OSError, ValueError) as error:
        raise DatasetError(f"image-folder: {path} is not a readable image ({error})") from error
    if image_size is not None and converted.size != (image_size, image_size):
        converted = ImageOps.fit(converted, (image_size, image_size), Image.Resampling.BICUBIC)
    array = np.asarray(converted)
    return array[..., None] if array.ndim == 2 else array


def _stack(arrays: list[np.ndarray], root: Path) -> np.ndarray:
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) > 1:
        raise DatasetError(
            f"image-folder: {root} holds images of sizes {sorted(sizes)[:4]}; pass a resolution "
            f"(image_size) to center-crop and resize them, or make them one size"
        )
    if any(a.shape[-1] == 3 for a in arrays):
        arrays = [np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a for a in arrays]
    return np.stack(arrays)


def read_image_folder(
    path: Path, split: str, *, image_size: int | None = None, limit: int | None = None
) -> DatasetSplit:
    """Images (and class labels, if any) of a folder; all grayscale gives 1 channel, else RGB.

    ``image_size`` center-crops and resizes every image to a square of that side (PIL
    bicubic); without it all images must already share one size.
    """
    root = path / split if (path / split).is_dir() else path
    if not root.is_dir():
        raise DatasetError(f"image-folder: {root} is not a directory")
    entries, class_names = _list_files(root)
    if not entries:
        raise DatasetError(f"image-folder: no images ({', '.join(IMG_EXTENSIONS)}) under {root}")
    chosen = subset_indices(len(entries), limit)
    if chosen is not None:
        entries = [entries[i] for i in chosen]
    images = _stack([_read_image(name, image_size) for name, _ in entries], root)
    labels = np.array([label for _, label in entries], dtype=np.int64) if class_names else None
    return DatasetSplit("image-folder", split, images, labels, str(root), class_names=class_names)
