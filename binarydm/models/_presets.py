"""Named ``diffusers.UNet2DModel`` architectures, from a CPU test model to the paper's LDM-4.

- ``tiny``: CPU-friendly (280,177 params at 1 channel), 3 resolution levels with one
  attention level plus the attention mid block, so the level-scoped binarization and
  attention code paths all run; defaults to 1 channel at 32 px (MNIST padded).
- ``small``: ``ddpm-cifar10`` at a quarter of the width (2,245,763 params at 3 channels).
- ``ddpm-cifar10``: the architecture of google/ddpm-cifar10-32 (35,746,307 params).
- ``ldm4-bedroom``: the LDM-4 LSUN-Bedrooms UNet (CompVis ``lsun_beds256`` config:
  64x64x3 latents, model_channels 224, channel_mult 1,2,3,4, attention at 32/16/8,
  2 res blocks, 32 channels per head) in diffusers' layout: 274,056,163 params =
  1045.4 MiB in FP32, the paper's FP size figure.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from diffusers import UNet2DModel
from torch import nn

# google/ddpm-cifar10-32's embedding and padding choices (its config.json), shared by the
# small presets so that they differ from it only in size.
_DDPM_STYLE = {
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "norm_eps": 1e-6,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "time_embedding_type": "positional",
}

_DDPM_DOWN = ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")
_DDPM_UP = ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")

_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        **_DDPM_STYLE,
        "sample_size": 32,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": (16, 32, 32),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        "norm_num_groups": 8,
        "attention_head_dim": 8,
    },
    "small": {
        **_DDPM_STYLE,
        "sample_size": 32,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": (32, 64, 64, 64),
        "layers_per_block": 2,
        "down_block_types": _DDPM_DOWN,
        "up_block_types": _DDPM_UP,
        "norm_num_groups": 16,
        "attention_head_dim": 16,
    },
    "ddpm-cifar10": {
        **_DDPM_STYLE,
        "sample_size": 32,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": (128, 256, 256, 256),
        "layers_per_block": 2,
        "down_block_types": _DDPM_DOWN,
        "up_block_types": _DDPM_UP,
        "norm_num_groups": 32,
        "attention_head_dim": None,
    },
    "ldm4-bedroom": {
        "sample_size": 64,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": (224, 448, 672, 896),
        "layers_per_block": 2,
        "down_block_types": ("DownBlock2D",) + ("AttnDownBlock2D",) * 3,
        "up_block_types": ("AttnUpBlock2D",) * 3 + ("UpBlock2D",),
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "attention_head_dim": 32,
        "act_fn": "silu",
    },
}

PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {name: MappingProxyType(config) for name, config in _PRESETS.items()}
)
_UNET_ARGS = frozenset(inspect.signature(UNet2DModel.__init__).parameters) - {"self"}


def preset_config(
    preset: str, *, in_channels: int | None = None, sample_size: int | None = None, **overrides
) -> dict[str, Any]:
    """The ``UNet2DModel`` kwargs of ``preset`` with overrides applied and checked.

    ``in_channels`` sets ``out_channels`` too unless that is overridden: a noise
    predictor outputs as many channels as it reads.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r} is unknown: allowed {sorted(PRESETS)}")
    unknown = sorted(set(overrides) - _UNET_ARGS)
    if unknown:
        raise ValueError(f"UNet2DModel has no argument(s) {unknown}: allowed {sorted(_UNET_ARGS)}")
    config = dict(PRESETS[preset])
    if in_channels is not None:
        config["in_channels"] = config["out_channels"] = in_channels
    if sample_size is not None:
        config["sample_size"] = sample_size
    config.update(overrides)
    _check_sample_size(config)
    return config


def _check_sample_size(config: Mapping[str, Any]) -> None:
    size = config["sample_size"]
    sizes = size if isinstance(size, (tuple, list)) else (size, size)
    factor = 2 ** (len(config["block_out_channels"]) - 1)
    if any(side % factor for side in sizes):
        raise ValueError(
            f"sample_size={size} is invalid: {len(config['block_out_channels'])} resolution "
            f"levels need a multiple of {factor} so that skip connections line up"
        )


def build_unet(
    preset: str, *, in_channels: int | None = None, sample_size: int | None = None, **overrides
) -> UNet2DModel:
    """A freshly initialised ``UNet2DModel`` of ``preset`` (see ``preset_config``)."""
    config = preset_config(preset, in_channels=in_channels, sample_size=sample_size, **overrides)
    return UNet2DModel(**config)


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameter elements (optionally only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def resolution_levels(preset_or_path: str) -> int | None:
    """Resolution levels (``len(block_out_channels)``) of a preset or a local diffusers
    folder (its ``config.json`` or ``unet/config.json``); None when not known without
    loading the model (a hub id, an unreadable folder)."""
    if preset_or_path in PRESETS:
        return len(PRESETS[preset_or_path]["block_out_channels"])
    folder = Path(preset_or_path).expanduser()
    for config in (folder / "config.json", folder / "unet" / "config.json"):
        try:
            channels = json.loads(config.read_text()).get("block_out_channels")
        except (OSError, ValueError):
            continue
        if isinstance(channels, list) and channels:
            return len(channels)
    return None
