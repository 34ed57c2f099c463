"""Datasets on the real offline copies: paths, sources, caching, transforms, seeded DDP shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from binarydm.data import (
    CACHE_DIR_ENV,
    DATA_ROOT_ENV,
    OFFLINE_ENV,
    DatasetError,
    DatasetSplit,
    ImageDataset,
    cache_dir,
    data_root,
    from_model_tensor,
    infinite_batches,
    load_images,
    load_split,
    make_dataloader,
    prepare_images,
    to_model_tensor,
)

# sha256 of the decoded MNIST train split (shape, dtype, bytes): lossless, so the same
# for the offline copy and torchvision's download.
MNIST_TRAIN_SHA256 = "72eb7d056541"


@pytest.fixture
def offline(monkeypatch, tmp_path, shared_data) -> Path:
    """Data root = the shared offline copies, a fresh cache dir, no network attempts."""
    monkeypatch.setenv(DATA_ROOT_ENV, str(shared_data))
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(OFFLINE_ENV, "1")
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def mnist_train(shared_data, tmp_path_factory) -> DatasetSplit:
    cache = tmp_path_factory.mktemp("cache")
    return load_split("mnist", "train", data_root=shared_data, cache_dir=cache)


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# --- paths -------------------------------------------------------------------------------


def test_data_root_prefers_argument_then_env_then_local_folders(monkeypatch, tmp_path):
    explicit, from_env = tmp_path / "explicit", tmp_path / "env"
    explicit.mkdir()
    from_env.mkdir()
    monkeypatch.setenv(DATA_ROOT_ENV, str(from_env))
    assert data_root(explicit) == explicit.resolve()
    assert data_root() == from_env.resolve()

    monkeypatch.delenv(DATA_ROOT_ENV)
    work = tmp_path / "repo"
    (tmp_path / "shared" / "data").mkdir(parents=True)
    work.mkdir()
    monkeypatch.chdir(work)
    assert data_root() == (tmp_path / "shared" / "data").resolve()
    (work / "data").mkdir()
    assert data_root() == (work / "data").resolve()


def test_data_root_missing_names_what_was_tried(monkeypatch, tmp_path):
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError, match=DATA_ROOT_ENV) as info:
        data_root()
    assert str(tmp_path / "data") in str(info.value)
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match=str(tmp_path / "nowhere")):
        data_root()


def test_cache_dir_from_env_or_home(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "c"))
    assert cache_dir() == (tmp_path / "c").resolve()
    assert (tmp_path / "c").is_dir()
    monkeypatch.delenv(CACHE_DIR_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "binarydm"


# --- MNIST and hashes ----------------------------------------------------------------------


def test_mnist_splits_have_original_order_and_shapes(mnist_train, offline):
    assert mnist_train.images.shape == (60000, 28, 28, 1)
    assert mnist_train.images.dtype == np.uint8
    assert mnist_train.labels[:5].tolist() == [5, 0, 4, 1, 9]
    assert not mnist_train.jpeg_compressed
    test = load_split("mnist", "test")
    assert test.images.shape == (10000, 28, 28, 1)
    assert test.labels[:5].tolist() == [7, 2, 1, 0, 4]
    assert test.origin.endswith("mnist_uint8.npz")


def test_hash_is_stable_and_content_sensitive(mnist_train, offline):
    assert mnist_train.sha256.startswith(MNIST_TRAIN_SHA256)
    again = load_split("mnist", "train")
    assert again is not mnist_train
    assert again.sha256 == mnist_train.sha256
    changed = mnist_train.images[:100].copy()
    same = DatasetSplit("npz", "train", changed.copy(), None, "x")
    changed[0, 0, 0, 0] ^= 1
    assert DatasetSplit("npz", "train", changed, None, "x").sha256 != same.sha256


def test_limit_takes_a_fixed_subset_spanning_classes(offline):
    first = load_split("mnist", "test", limit=50)
    second = load_split("mnist", "test", limit=50)
    assert first.images.shape == (50, 28, 28, 1)
    np.testing.assert_array_equal(first.images, second.images)
    assert len(set(first.labels.tolist())) == 10


# --- CIFAR-10 decode cache -------------------------------------------------------------------


def test_cifar_subset_is_decoded_once_then_read_from_cache(offline):
    split = load_split("cifar10", "test", limit=200)
    assert split.images.shape == (200, 32, 32, 3)
    assert split.jpeg_compressed
    assert "not with published CIFAR-10 FIDs" in split.note
    assert len(set(split.labels.tolist())) == 10  # stored order is by class
    cached = files_under(offline)
    assert len(cached) == 1 and cached[0].startswith("cifar10/test-200-")
    assert cached[0].endswith(".npy")

    # Replace the cached decode: a second load returning it proves it reads the cache.
    marker = np.full_like(split.images, 7)
    np.save(offline / cached[0], marker)
    np.testing.assert_array_equal(load_split("cifar10", "test", limit=200).images, marker)


def test_cifar_corrupt_cache_is_decoded_again(offline):
    original = load_split("cifar10", "test", limit=64)
    (cache_file,) = (offline / "cifar10").iterdir()
    cache_file.write_bytes(cache_file.read_bytes()[:1000])
    reloaded = load_split("cifar10", "test", limit=64)
    np.testing.assert_array_equal(reloaded.images, original.images)
    assert reloaded.sha256 == original.sha256


def test_cifar_with_an_undecodable_image_errors_and_caches_nothing(offline, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    good = Image.new("RGB", (32, 32), (10, 20, 30))
    path = root / "good.jpg"
    good.save(path, quality=75)
    blob = np.frombuffer(path.read_bytes() + b"not a jpeg at all", dtype=np.uint8)
    size = path.stat().st_size
    np.savez(
        root / "cifar10_jpeg_bytes.npz",
        test_jpeg=blob,
        test_offsets=np.array([0, size, len(blob)], dtype=np.int64),
        test_labels=np.array([0, 1], dtype=np.uint8),
    )
    with pytest.raises(DatasetError, match=str(root / "cifar10_jpeg_bytes.npz")) as info:
        load_split("cifar10", "test", data_root=root)
    assert "image 1 does not decode" in str(info.value) and DATA_ROOT_ENV in str(info.value)
    assert files_under(offline) == []


# --- errors ------------------------------------------------------------------------------


def test_missing_offline_copy_without_download_is_one_clear_error(tmp_path, offline):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError) as info:
        load_split("mnist", "train", data_root=empty, download=False)
    message = str(info.value)
    assert str(empty / "mnist_uint8.npz") in message
    assert DATA_ROOT_ENV in message and "network" in message
    assert not any(p.suffix == ".tmp" for p in offline.rglob("*"))


def test_malformed_npz_names_its_path(tmp_path, offline):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 definitely not a zip archive")
    with pytest.raises(DatasetError, match=str(bad)):
        load_split("npz", path=bad)
    floats = tmp_path / "floats.npz"
    np.savez(floats, images=np.zeros((2, 8, 8), dtype=np.float32))
    with pytest.raises(DatasetError, match="float32.*expected uint8"):
        load_split("npz", path=floats)
    with pytest.raises(DatasetError, match=str(tmp_path / "absent.npz")):
        load_split("npz", path=tmp_path / "absent.npz")


def test_unknown_source_and_split_are_rejected(offline):
    with pytest.raises(DatasetError, match="allowed"):
        load_split("imagenet", "train")
    with pytest.raises(ValueError, match="allowed"):
        load_split("mnist", "validation")


# --- user files ------------------------------------------------------------------------------


def test_npz_round_trip_with_default_and_named_keys(tmp_path, offline):
    subset = load_split("mnist", "test", limit=20)
    gray = subset.images[..., 0]
    np.savez(tmp_path / "hw.npz", images=gray, labels=subset.labels)
    loaded = load_split("npz", "test", path=tmp_path / "hw.npz")
    np.testing.assert_array_equal(loaded.images, subset.images)
    np.testing.assert_array_equal(loaded.labels, subset.labels)
    assert loaded.sha256 == subset.sha256

    rgb = np.repeat(subset.images, 3, axis=-1)
    np.savez(tmp_path / "rgb.npz", pixels=rgb)
    named = load_split("npz", "train", path=tmp_path / "rgb.npz", images_key="pixels")
    assert named.images.shape == (20, 28, 28, 3) and named.labels is None
    with pytest.raises(DatasetError, match="pixels"):
        load_split("npz", "train", path=tmp_path / "rgb.npz")


def test_image_folder_round_trip_with_class_subfolders(tmp_path, offline):
    subset = load_split("mnist", "train", limit=12)
    for index, (image, label) in enumerate(zip(subset.images, subset.labels, strict=True)):
        folder = tmp_path / "digits" / "train" / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[..., 0]).save(folder / f"{index:03d}.png")
    loaded = load_split("image-folder", "train", path=tmp_path / "digits")
    assert loaded.images.shape == (12, 28, 28, 1)
    assert loaded.class_names == tuple(sorted({str(label) for label in subset.labels}))
    # Files are read class by class: compare as multisets of (label, image bytes).
    names = loaded.class_names
    read = sorted(
        (names[y], x.tobytes()) for x, y in zip(loaded.images, loaded.labels, strict=True)
    )
    written = sorted(
        (str(y), x.tobytes()) for x, y in zip(subset.images, subset.labels, strict=True)
    )
    assert read == written


def test_image_folder_flat_mixed_sizes_need_a_resolution(tmp_path, offline):
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (40, 30), (200, 0, 0)).save(flat / "a.png")
    Image.new("L", (32, 32), 90).save(flat / "b.png")
    with pytest.raises(DatasetError, match="image_size"):
        load_split("image-folder", path=flat)
    fitted = load_split("image-folder", path=flat, image_size=16)
    assert fitted.images.shape == (2, 16, 16, 3) and fitted.labels is None
    assert fitted.images[0, 8, 8].tolist() == [200, 0, 0]
    assert fitted.images[1, 8, 8].tolist() == [90, 90, 90]


# --- transforms --------------------------------------------------------------------------------


def test_mnist_pads_to_32_exactly_and_resizes_to_16(mnist_train):
    digits = mnist_train.images[:8]
    padded = prepare_images(digits, 32, 1)
    assert padded.shape == (8, 32, 32, 1)
    np.testing.assert_array_equal(padded[:, 2:30, 2:30], digits)
    assert padded[:, :2].max() == 0 and padded[:, 30:].max() == 0
    small = prepare_images(digits, 16, 1)
    assert small.shape == (8, 16, 16, 1)
    # Antialiased downsampling keeps the mean intensity within a grey level or two.
    assert abs(float(small.mean()) - float(digits.mean())) < 2.0


def test_channel_conversion(offline):
    cifar = load_split("cifar10", "test", limit=16).images
    gray = prepare_images(cifar, 32, 1)
    luma = cifar.astype(np.float64) @ np.array([0.2989, 0.587, 0.114])
    assert np.abs(gray[..., 0] - luma).max() <= 1.0
    rgb = prepare_images(gray, 32, 3)
    assert (rgb == gray).all()


def test_model_tensor_range_and_exact_round_trip(mnist_train):
    tensor = to_model_tensor(mnist_train.images[:64])
    assert tensor.shape == (64, 1, 28, 28) and tensor.dtype == torch.float32
    assert tensor.min().item() == -1.0 and tensor.max().item() == 1.0
    np.testing.assert_array_equal(from_model_tensor(tensor), mnist_train.images[:64])


def test_load_images_fits_source_for_fid_reference(offline):
    reference = load_images("mnist", "test", 32, 3, limit=8)
    assert reference.shape == (8, 32, 32, 3) and reference.dtype == np.uint8
    expected = prepare_images(load_split("mnist", "test", limit=8).images, 32, 3)
    np.testing.assert_array_equal(reference, expected)


# --- torch dataset and loaders ---------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist_dataset(shared_data, tmp_path_factory) -> ImageDataset:
    return ImageDataset.from_source(
        "mnist",
        "test",
        32,
        1,
        limit=1200,
        data_root=shared_data,
        cache_dir=tmp_path_factory.mktemp("cache"),
    )


def test_dataset_items_are_model_ready(mnist_dataset):
    assert len(mnist_dataset) == 1200
    item = mnist_dataset[3]
    assert item.shape == (1, 32, 32) and item.dtype == torch.float32
    assert -1.0 <= item.min().item() < item.max().item() <= 1.0
    assert mnist_dataset.split.num_images == 1200 and len(mnist_dataset.split.sha256) == 64


def test_seeded_order_repeats_per_seed_and_differs_across_seeds_and_epochs(mnist_dataset):
    def first_batch(seed):
        return next(iter(make_dataloader(mnist_dataset, 32, seed=seed)))

    torch.testing.assert_close(first_batch(0), first_batch(0), rtol=0, atol=0)
    assert not torch.equal(first_batch(0), first_batch(1))
    loader = make_dataloader(mnist_dataset, 32, seed=0)
    order0 = list(loader.sampler)
    expected = torch.stack([mnist_dataset[i] for i in order0[:32]])
    torch.testing.assert_close(next(iter(loader)), expected, rtol=0, atol=0)
    batches = infinite_batches(loader)
    for _ in range(len(loader) + 1):
        next(batches)
    assert loader.sampler.epoch == 1 and list(loader.sampler) != order0


@pytest.mark.parametrize(("size", "world_size"), [(1200, 4), (1001, 3)])
def test_ddp_shards_are_disjoint_and_cover_the_data(mnist_dataset, size, world_size):
    dataset = torch.utils.data.Subset(mnist_dataset, range(size))
    shards = [
        list(make_dataloader(dataset, 8, seed=5, rank=rank, world_size=world_size).sampler)
        for rank in range(world_size)
    ]
    seen = [i for shard in shards for i in shard]
    assert len(seen) == len(set(seen))  # disjoint
    assert len(seen) == size - size % world_size  # covering, up to the dropped remainder
    assert {len(shard) for shard in shards} == {size // world_size}


def test_loader_refuses_shards_smaller_than_a_batch(mnist_dataset):
    with pytest.raises(ValueError, match="no full batch"):
        make_dataloader(mnist_dataset, 512, seed=0, world_size=4)
    with pytest.raises(ValueError, match="rank=4"):
        make_dataloader(mnist_dataset, 8, seed=0, rank=4, world_size=4)


def write_idx(path: Path, array: np.ndarray) -> None:
    """The IDX format of the original MNIST files (big-endian dims after a type/rank magic)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(size).to_bytes(4, "big") for size in array.shape
    )
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def test_torchvision_copy_in_cache_is_used_without_offline_file(tmp_path, offline):
    """An earlier torchvision download in the cache dir serves MNIST; it hashes like the copy."""
    offline_test = load_split("mnist", "test")
    raw = offline / "torchvision" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / "t10k-images-idx3-ubyte", offline_test.images[..., 0])
    write_idx(raw / "t10k-labels-idx1-ubyte", offline_test.labels)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (raw / name).touch()  # torchvision checks that all four files exist
    empty = tmp_path / "empty"
    empty.mkdir()
    downloaded = load_split("mnist", "test", data_root=empty, download=False)
    assert downloaded.origin == str(offline / "torchvision")
    assert downloaded.sha256 == offline_test.sha256
    assert downloaded.labels[:5].tolist() == [7, 2, 1, 0, 4]
