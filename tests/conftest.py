"""Shared fixtures: offline data roots, small UNets, and one session-scoped local Ray cluster."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = Path(os.environ.get("BINARYDM_DATA_ROOT", SHARED_DATA))
    if not (root / "mnist_uint8.npz").exists():
        pytest.skip(f"offline datasets not found under {root} (set BINARYDM_DATA_ROOT)")
    return root


def small_unet(sample_size: int = 16, channels: int = 3, seed: int = 0):
    """A 3-level diffusers UNet with attention in level 1: every binarize_ code path."""
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=8,
    )


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test session (starting Ray costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def workspace(tmp_path_factory, shared_data) -> dict:
    """Session-wide data root, cache (teachers, FID stats and weights) and Ray storage."""
    root = tmp_path_factory.mktemp("bdm")
    cache = Path(os.environ.get("BINARYDM_CACHE_DIR", root / "cache"))
    os.environ["BINARYDM_DATA_ROOT"] = str(shared_data)
    os.environ["BINARYDM_CACHE_DIR"] = str(cache)
    os.environ.setdefault("TORCH_HOME", str(cache / "torch"))
    return {"data_root": str(shared_data), "cache_dir": str(cache), "storage": str(root / "ray")}


def tiny_settings(**overrides):
    """A trial that runs in seconds on a CPU: tiny UNet, MNIST 16 px, 64-d FID."""
    from binarydm.train.settings import TrialSettings

    base = {
        "teacher.steps": 40,
        "teacher.batch_size": 32,
        "training.steps": 20,
        "training.batch_size": 16,
        "training.checkpoint_every": 10,
        "training.log_every": 10,
        "evaluation.fid_samples": 100,
        "evaluation.fid_dims": 64,
        "evaluation.sampling_steps": 4,
        "evaluation.sample_batch_size": 100,
        "evaluation.test_loss_images": 64,
        "evaluation.grid_images": 16,
    }
    base.update(overrides)
    return TrialSettings().replace(**base)


@pytest.fixture(scope="session")
def tiny_teacher(ray_cluster, workspace) -> Path:
    from binarydm.train.runner import ensure_teacher

    return ensure_teacher(
        tiny_settings(),
        storage_path=workspace["storage"],
        data_root=workspace["data_root"],
        cache_dir=workspace["cache_dir"],
    )
