"""PCA projections of the teacher's block features for LRM (method.md section 4).

For each block, the top ``round(size / rank_divisor)`` principal directions of the
teacher's feature along one axis: the channel axis (the paper; every spatial
position of every sample is an observation of C channels) or the spatial width
axis (the official code; every other index is an observation of W values).

The basis is an exact eigendecomposition (``torch.linalg.eigh`` of the fp32
covariance, eigenvalues descending, each eigenvector's largest-magnitude entry
made positive), not ``torch.pca_lowrank``, which is randomized and truncates to
q=6 by default. Under ``torch.distributed`` rank 0 computes it and broadcasts it,
because every rank sees different data and must still mimic in the same subspace.
The bases are buffers, so they travel with checkpoints and a resumed run keeps
the projection it started with.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from binarydm.quant.config import LRMAxis


def lrm_rank(size: int, rank_divisor: int) -> int:
    """Components kept out of ``size``: ``round(size / rank_divisor)``, at least 1.

    Python's ``round`` (halves to even: 10 channels / 4 keeps 2) so the rank is the
    same number everywhere it is computed or reported.
    """
    return max(1, round(size / rank_divisor))


def feature_dim(axis: LRMAxis, ndim: int) -> int:
    """Tensor dimension PCA runs over: 1 (channels of B,C,H,W) or the last one (width)."""
    if axis == "channel":
        return 1
    if axis == "width":
        return ndim - 1
    raise ValueError(f"axis={axis!r} is invalid: allowed 'channel' or 'width'")


@torch.no_grad()
def pca_basis(feature: torch.Tensor, rank: int, axis: LRMAxis = "channel") -> torch.Tensor:
    """(size, rank) fp32 orthonormal basis of the top principal directions along ``axis``.

    Deterministic for a given input: no randomness, descending eigenvalue order and
    a fixed sign per eigenvector (its largest-magnitude entry is positive; the
    first one on a tie).
    """
    dim = feature_dim(axis, feature.dim())
    size = feature.shape[dim]
    if not 1 <= rank <= size:
        raise ValueError(f"rank={rank} is invalid for a feature of size {size} along {axis!r}")
    observations = feature.detach().float().movedim(dim, -1).reshape(-1, size)
    centered = observations - observations.mean(dim=0, keepdim=True)
    covariance = centered.T @ centered / max(observations.shape[0] - 1, 1)
    _, eigenvectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
    top = eigenvectors.flip(-1)[:, :rank]
    peak = top.abs().argmax(dim=0)
    signs = torch.where(top[peak, torch.arange(rank, device=top.device)] < 0, -1.0, 1.0)
    return (top * signs).contiguous()


def _buffer_name(block: str) -> str:
    # Buffer names may not contain ".", block names ("down_blocks.0") do.
    return block.replace(".", "_")


class LowRankProjection(nn.Module):
    """One fixed (or periodically refreshed) PCA basis per block, kept as buffers.

    ``updated_step`` is the training step of the last computation (-1: never), so
    the refresh schedule survives a checkpoint round trip. A fresh instance loads
    a checkpoint's bases whatever their shapes (they are unknown before the first
    batch).
    """

    def __init__(
        self,
        block_names: Iterable[str],
        *,
        rank_divisor: int = 4,
        axis: LRMAxis = "channel",
        refresh_every: int = 0,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.block_names = list(block_names)
        self.rank_divisor = rank_divisor
        self.axis = axis
        self.refresh_every = refresh_every
        self.process_group = process_group
        feature_dim(axis, 4)  # validate the axis now, not at the first batch
        self._buffer_names = {block: _buffer_name(block) for block in self.block_names}
        if len(set(self._buffer_names.values())) != len(self.block_names):
            raise ValueError(f"block names collide once '.' becomes '_': {self.block_names}")
        for buffer in self._buffer_names.values():
            self.register_buffer(buffer, torch.empty(0))
        self.register_buffer("updated_step", torch.tensor(-1, dtype=torch.long))
        # Python mirror of updated_step: reading a CUDA buffer every step would sync the GPU.
        self._last_update = -1

    @property
    def initialized(self) -> bool:
        return self._last_update >= 0

    def basis(self, block: str) -> torch.Tensor:
        """(size, rank) basis of ``block``; empty before the first update."""
        return getattr(self, self._buffer_names[block])

    def needs_update(self, step: int) -> bool:
        """True before the first batch, and every ``refresh_every`` steps after it if > 0."""
        if not self.initialized:
            return True
        return self.refresh_every > 0 and step - self._last_update >= self.refresh_every

    def maybe_update(self, teacher_features: Mapping[str, torch.Tensor], step: int) -> bool:
        """Recompute the bases from the teacher's features if due; True when it did."""
        if not self.needs_update(step):
            return False
        self.update(teacher_features, step)
        return True

    @torch.no_grad()
    def update(self, teacher_features: Mapping[str, torch.Tensor], step: int) -> None:
        """Compute every block's basis (on rank 0 under torch.distributed) and store it."""
        self.check_blocks(teacher_features)
        distributed = dist.is_available() and dist.is_initialized()
        is_source = not distributed or dist.get_rank(self.process_group) == 0
        bases = []
        for block in self.block_names:
            feature = teacher_features[block]
            size = feature.shape[feature_dim(self.axis, feature.dim())]
            rank = lrm_rank(size, self.rank_divisor)
            if is_source:
                bases.append(pca_basis(feature, rank, self.axis))
            else:
                bases.append(torch.empty(size, rank, dtype=torch.float32, device=feature.device))
        if distributed:
            self._broadcast_from_first_rank(bases)
        for block, basis in zip(self.block_names, bases, strict=True):
            setattr(self, self._buffer_names[block], basis)
        self.updated_step.fill_(step)
        self._last_update = step

    def _broadcast_from_first_rank(self, bases: list[torch.Tensor]) -> None:
        # One collective for all blocks: a call per block would cost a round trip each.
        flat = torch.cat([basis.flatten() for basis in bases])
        source = 0
        if self.process_group is not None:
            source = dist.get_global_rank(self.process_group, 0)
        dist.broadcast(flat, src=source, group=self.process_group)
        offset = 0
        for basis in bases:
            basis.copy_(flat[offset : offset + basis.numel()].view_as(basis))
            offset += basis.numel()

    def project(self, block: str, feature: torch.Tensor) -> torch.Tensor:
        """``feature`` in fp32 with ``axis`` moved last and reduced to the basis' rank."""
        if not self.initialized:
            raise RuntimeError("projection used before its first update (no teacher batch seen)")
        basis = self.basis(block)
        dim = feature_dim(self.axis, feature.dim())
        if feature.shape[dim] != basis.shape[0]:
            raise ValueError(
                f"{block}: feature has {feature.shape[dim]} entries along {self.axis!r}, the "
                f"stored basis {basis.shape[0]}; a checkpoint of another model or resolution?"
            )
        return feature.float().movedim(dim, -1) @ basis.to(feature.device)

    def check_blocks(self, features: Mapping[str, torch.Tensor]) -> None:
        """Raise KeyError naming the blocks this projection has but ``features`` lacks."""
        missing = [block for block in self.block_names if block not in features]
        if missing:
            raise KeyError(f"features of blocks {missing} missing; got {list(features)}")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # The bases' shapes are only known after the first batch: take the checkpoint's.
        for buffer in self._buffer_names.values():
            incoming = state_dict.get(prefix + buffer)
            if incoming is not None:
                current = self._buffers[buffer]
                self._buffers[buffer] = torch.empty_like(incoming, device=current.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._last_update = int(self.updated_step)

    def extra_repr(self) -> str:
        return (
            f"blocks={len(self.block_names)}, rank_divisor={self.rank_divisor}, "
            f"axis={self.axis!r}, refresh_every={self.refresh_every}"
        )
