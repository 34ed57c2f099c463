"""Deterministic, resumable data order for DDP: the batch of (step, rank) is a pure function.

The training set is read as an endless stream of seeded epoch permutations; the
global batch of step s is positions ``[s*B*W, (s+1)*B*W)`` of that stream and rank
r takes its r-th slice. A run resumed at step s therefore sees exactly the
batches it would have seen, on every rank, without saving sampler state.
"""

from __future__ import annotations

import torch


def epoch_permutation(num_items: int, epoch: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_items, generator=generator)


def batch_indices(
    step: int, *, rank: int, world_size: int, batch_size: int, num_items: int, seed: int
) -> torch.Tensor:
    start = (step * world_size + rank) * batch_size
    positions = torch.arange(start, start + batch_size)
    epochs = positions // num_items
    out = torch.empty(batch_size, dtype=torch.long)
    for epoch in epochs.unique().tolist():
        mask = epochs == epoch
        out[mask] = epoch_permutation(num_items, epoch, seed)[positions[mask] % num_items]
    return out
