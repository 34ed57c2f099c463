"""Builders shared by tests in several folders (importable: tests/ is on sys.path).

Kept out of conftest.py on purpose: with a conftest in tests/integration as well,
``from bdm_support import ...`` would resolve to whichever conftest was imported first.
"""

from __future__ import annotations


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
