"""Training data for the UNet: a torch ``Dataset`` of [-1, 1] images and seeded, sharded loaders.

Sharding uses ``torch.utils.data.DistributedSampler`` with an explicit ``rank`` and
``world_size`` (no process group needed) and ``seed``: every rank draws the same
seeded permutation per epoch and takes a disjoint strided slice of it. With
``drop_last=True`` (the default) the shards are disjoint and together cover all but
``len % world_size`` images; with ``drop_last=False`` the sampler pads the last
shards with repeated images so that every rank has the same number of batches.
Call ``loader.sampler.set_epoch(epoch)`` each epoch (``infinite_batches`` does) or
every epoch repeats the same order. Do not hand these loaders to Ray Train's
``prepare_data_loader`` with ``add_dist_sampler=True``: they are sharded already.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from binarydm.data._sources import load_split
from binarydm.data._split import DatasetSplit
from binarydm.data._transforms import Fit, prepare_images, to_model_tensor


class ImageDataset(Dataset):
    """Images at the model's resolution and channels, served as float32 CHW in [-1, 1].

    Stored as uint8 (4x less memory than floats); ``split`` keeps the source as read,
    whose ``sha256`` and ``note`` a run logs.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray | None = None,
        *,
        split: DatasetSplit | None = None,
        return_labels: bool = False,
    ) -> None:
        if return_labels and labels is None:
            raise ValueError("return_labels=True but the source has no labels")
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.int64)
        self.split = split
        self.return_labels = return_labels

    @classmethod
    def from_source(
        cls,
        source: str,
        split: str,
        resolution: int,
        channels: int,
        *,
        fit: Fit = "auto",
        return_labels: bool = False,
        **load_options,
    ) -> ImageDataset:
        """Load ``split`` of ``source`` (``load_split`` options) and fit it to the model."""
        loaded = load_split(source, split, image_size=resolution, **load_options)
        images = prepare_images(loaded.images, resolution, channels, fit=fit)
        return cls(images, loaded.labels, split=loaded, return_labels=return_labels)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int):
        image = to_model_tensor(self.images[index : index + 1])[0]
        if self.return_labels:
            return image, self.labels[index]
        return image


def make_dataloader(
    dataset: Dataset,
    batch_size: int,
    *,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = True,
    drop_last: bool = True,
    num_workers: int = 0,
) -> DataLoader:
    """A loader over this rank's shard, in a seeded order (see the module docstring)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is invalid for world_size={world_size}")
    sampler = DistributedSampler(
        dataset,
        num_replicas=world_size,
        rank=rank,
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
    )
    if drop_last and len(sampler) < batch_size:
        raise ValueError(
            f"{len(dataset)} images over {world_size} ranks leave {len(sampler)} per rank, "
            f"fewer than batch_size={batch_size}: no full batch"
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        # Seeds worker processes' RNGs; offset by rank so ranks do not share worker streams.
        generator=torch.Generator().manual_seed(seed + rank),
    )


def infinite_batches(loader: DataLoader, start_epoch: int = 0) -> Iterator:
    """Batches forever, advancing the sampler's epoch so each epoch has a new seeded order."""
    epoch = start_epoch
    while True:
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def load_images(
    source: str,
    split: str,
    resolution: int,
    channels: int,
    *,
    data_root: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    path: str | os.PathLike | None = None,
    fit: Fit = "auto",
) -> np.ndarray:
    """uint8 NHWC images of a source at the target resolution/channels (e.g. FID references)."""
    loaded = load_split(
        source,
        split,
        data_root=data_root,
        cache_dir=cache_dir,
        limit=limit,
        path=path,
        image_size=resolution,
    )
    return prepare_images(loaded.images, resolution, channels, fit=fit)
