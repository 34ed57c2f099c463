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
