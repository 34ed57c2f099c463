"""Fitting stored images to a model's resolution and channels, and the [-1, 1] tensor convention.

``fit="auto"`` pads when the target is only a few pixels larger (MNIST 28 -> 32, the
DDPM convention: strokes stay pixel-exact on the black background) and resizes
otherwise (antialiased bilinear on the shorter side, then a center crop).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torchvision.transforms.v2 import functional as tvf

Fit = Literal["auto", "pad", "resize"]
FITS = ("auto", "pad", "resize")
MAX_AUTO_PAD_PER_SIDE = 4
_CHUNK = 4096  # images per resize call: bounds the float buffers torchvision allocates


def _pads(height: int, width: int, resolution: int) -> list[int]:
    top, left = (resolution - height) // 2, (resolution - width) // 2
    return [left, top, resolution - width - left, resolution - height - top]


def _choose_fit(fit: Fit, height: int, width: int, resolution: int) -> str:
    if fit not in FITS:
        raise ValueError(f"fit={fit!r} is invalid: allowed {FITS}")
    if fit != "auto":
        return fit
    larger_by = resolution - max(height, width)
    return "pad" if 0 <= larger_by <= 2 * MAX_AUTO_PAD_PER_SIDE else "resize"


def _fit_chunk(chunk: torch.Tensor, how: str, resolution: int) -> torch.Tensor:
    height, width = chunk.shape[-2:]
    if (height, width) == (resolution, resolution):
        return chunk
    if how == "pad":
        if max(height, width) > resolution:
            raise ValueError(f"cannot pad {height}x{width} images to {resolution}: resize them")
        return tvf.pad(chunk, _pads(height, width, resolution), fill=0)
    resized = tvf.resize(chunk, resolution, antialias=True)
    return tvf.center_crop(resized, [resolution, resolution])


def _convert_channels(chunk: torch.Tensor, channels: int) -> torch.Tensor:
    if chunk.shape[1] == channels:
        return chunk
    if channels == 3:
        return tvf.grayscale_to_rgb(chunk)
    return tvf.rgb_to_grayscale(chunk, num_output_channels=1)


def prepare_images(
    images: np.ndarray, resolution: int, channels: int, *, fit: Fit = "auto"
) -> np.ndarray:
    """uint8 NHWC images -> uint8 NHWC at ``resolution`` x ``resolution`` with ``channels``.

    Grayscale to RGB repeats the channel; RGB to grayscale uses ITU-R 601 luma.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels={channels} is invalid: allowed 1 or 3")
    if resolution <= 0:
        raise ValueError(f"resolution={resolution} is invalid: allowed a positive size")
    how = _choose_fit(fit, images.shape[1], images.shape[2], resolution)
    out = np.empty((len(images), resolution, resolution, channels), dtype=np.uint8)
    for start in range(0, len(images), _CHUNK):
        chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + _CHUNK]))
        chunk = _fit_chunk(chunk.permute(0, 3, 1, 2), how, resolution)
        chunk = _convert_channels(chunk, channels)
        out[start : start + len(chunk)] = chunk.permute(0, 2, 3, 1).numpy()
    return out


def to_model_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW in [-1, 1] (0 -> -1, 255 -> 1)."""
    tensor = torch.as_tensor(images)
    return tensor.permute(0, 3, 1, 2).to(torch.float32).div(127.5).sub(1.0)


def from_model_tensor(samples: torch.Tensor) -> np.ndarray:
    """float NCHW in [-1, 1] (model samples) -> uint8 NHWC, clamped and rounded."""
    scaled = (samples.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5
    return scaled.round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
