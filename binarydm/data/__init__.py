"""Datasets for BinaryDM: offline copies, torchvision downloads and a user's own images.

``load_split`` reads one split of a named source (``mnist``, ``cifar10``, ``npz``,
``image-folder``) as stored, with its hash; ``prepare_images`` / ``load_images`` fit
images to a model's resolution and channels; ``ImageDataset`` and ``make_dataloader``
serve them as [-1, 1] tensors in a seeded, DDP-sharded order.

Paths: the data root is ``data_root=``, else ``$BINARYDM_DATA_ROOT``, else ./data or
../shared/data; derived files (decoded CIFAR-10, downloads) go to ``cache_dir=``, else
``$BINARYDM_CACHE_DIR``, else ~/.cache/binarydm. Imports torch, torchvision, numpy and
PIL only.
"""

from binarydm.data._cifar_jpeg import CIFAR10_JPEG_FILE, CIFAR10_JPEG_NOTE
from binarydm.data._loader import ImageDataset, infinite_batches, load_images, make_dataloader
from binarydm.data._paths import (
    CACHE_DIR_ENV,
    DATA_ROOT_ENV,
    OFFLINE_ENV,
    DatasetError,
    cache_dir,
    data_root,
)
from binarydm.data._sources import CIFAR10_CLASSES, MNIST_FILE, SOURCES, load_split
from binarydm.data._split import SPLITS, DatasetSplit, subset_indices
from binarydm.data._transforms import FITS, from_model_tensor, prepare_images, to_model_tensor

__all__ = [
    "CACHE_DIR_ENV",
    "CIFAR10_CLASSES",
    "CIFAR10_JPEG_FILE",
    "CIFAR10_JPEG_NOTE",
    "DATA_ROOT_ENV",
    "FITS",
    "MNIST_FILE",
    "OFFLINE_ENV",
    "SOURCES",
    "SPLITS",
    "DatasetError",
    "DatasetSplit",
    "ImageDataset",
    "cache_dir",
    "data_root",
    "from_model_tensor",
    "infinite_batches",
    "load_images",
    "load_split",
    "make_dataloader",
    "prepare_images",
    "subset_indices",
    "to_model_tensor",
]
