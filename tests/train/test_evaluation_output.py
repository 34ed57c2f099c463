"""What evaluation shows a user: the enlarged sample grid, and the sampler's progress
steps that drive its progress bar."""

from __future__ import annotations

import numpy as np
import torch
from bdm_support import small_unet
from PIL import Image

from binarydm.train._diffusion import ddim_sample
from binarydm.train._evaluate import MIN_TILE_PX, save_grid


def test_sample_grid_enlarges_small_tiles_by_whole_pixels(tmp_path):
    """8 MNIST tiles of 16 px: 4x nearest neighbour, so each source pixel is a 4x4 block
    of the same value (no interpolation) and the grid is wide enough to see."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(8, 16, 16, 1), dtype=np.uint8)
    save_grid(images, tmp_path / "samples.png")
    grid = np.asarray(Image.open(tmp_path / "samples.png"))
    assert grid.ndim == 3 and (grid == grid[..., :1]).all()  # grey tiles as RGB (make_grid)
    grid = grid[..., 0]
    scale, pad = MIN_TILE_PX // 16, 2 * (MIN_TILE_PX // 16)
    assert grid.shape == (64 + 2 * pad, 8 * 64 + 9 * pad)  # one row of 8 tiles
    first = grid[pad : pad + 64, pad : pad + 64]
    assert np.array_equal(first[::scale, ::scale], images[0, :, :, 0])
    assert np.array_equal(first, np.kron(images[0, :, :, 0], np.ones((4, 4), np.uint8)))
    # Tiles already MIN_TILE_PX or larger keep their size.
    big = rng.integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8)
    save_grid(big, tmp_path / "big.png")
    assert np.asarray(Image.open(tmp_path / "big.png")).shape == (64 + 4, 2 * 64 + 6, 3)


def test_sampler_calls_on_step_once_per_denoising_step_of_each_batch():
    torch.manual_seed(0)
    model = small_unet().eval()
    calls = []
    with torch.no_grad():
        quiet = ddim_sample(model, 5, steps=3, seed=1, batch_size=2)
        counted = ddim_sample(
            model, 5, steps=3, seed=1, batch_size=2, on_step=lambda: calls.append(1)
        )
    assert len(calls) == 3 * 3  # ceil(5 / 2) batches x 3 steps
    assert torch.equal(quiet, counted)  # the callback changes nothing sampled
