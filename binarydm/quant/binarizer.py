"""Weight binarizers: the 1-basis XNOR baseline, the learnable multi-basis LMB, and EBB.

``w_b = sum_i s_i * sign(r_{i-1})`` with ``r_0 = w`` and ``r_i = r_{i-1} - s_i b_i``;
each ``s_i`` is a learnable per-output-channel scale initialised once to
``mean(|r_{i-1}|)`` from the FP weights. All state (scales, the init flag, the
number of bases still computed after an EBB switch and the gain EBB's anneal puts
on the second basis) lives in the state dict.
"""

from __future__ import annotations

import torch
from torch import nn

from binarydm.quant.ste import sign_pm1, sign_ste


class MultiBasisBinarizer(nn.Module):
    """k residual sign bases with learnable per-output-channel scales (k=1 is the baseline)."""

    #: Python mirrors of the flag buffers; copies of the state (the EMA) copy them too.
    host_mirrors = ("_initialized", "_num_active")

    def __init__(self, weight_shape: torch.Size | tuple[int, ...], bases: int) -> None:
        super().__init__()
        if not 1 <= bases <= 3:
            raise ValueError(f"bases={bases} is invalid: allowed 1..3")
        self.bases = bases
        scale_shape = (bases, weight_shape[0]) + (1,) * (len(weight_shape) - 1)
        self.scales = nn.Parameter(torch.ones(scale_shape))
        self.register_buffer("initialized", torch.tensor(False))
        # Bases still computed: drops to 1 at the EBB switch and stays there.
        self.register_buffer("active_bases", torch.tensor(bases, dtype=torch.long))
        if bases >= 2:
            # EBB's anneal scales the second basis' term to 0 before the switch. A tensor, not
            # a Python float: a float would be a constant to torch.compile, recompiled per step.
            self.register_buffer("second_basis_gain", torch.tensor(1.0))
        # Python mirrors of the two buffers: reading a CUDA buffer in forward would sync the
        # GPU once per layer per step (and break torch.compile graphs).
        self._initialized = False
        self._num_active = bases

    @torch.no_grad()
    def initialize(self, weight: torch.Tensor) -> None:
        residual = weight.detach().float()
        reduce_dims = tuple(range(1, weight.dim()))
        for i in range(self.bases):
            scale = residual.abs().mean(dim=reduce_dims, keepdim=True)
            self.scales[i].copy_(scale)
            residual = residual - scale * sign_pm1(residual)
        self.initialized.fill_(True)
        self._initialized = True

    @property
    def num_active(self) -> int:
        return self._num_active

    def set_active_bases(self, count: int) -> None:
        count = max(1, min(self.bases, count))
        if count != self._num_active:
            self.active_bases.fill_(count)
            self._num_active = count

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initialized = bool(self.initialized)
        self._num_active = int(self.active_bases)

    @torch.no_grad()
    def set_second_basis_gain(self, gain: float) -> None:
        """EBB's anneal: the second basis contributes ``gain * s_2 * b_2`` (1 = LMB)."""
        if self.bases >= 2:
            self.second_basis_gain.fill_(gain)  # queued on the device: no host sync

    def _scale(self, i: int, dtype: torch.dtype) -> torch.Tensor:
        scale = self.scales[i]
        if i == 1:
            scale = scale * self.second_basis_gain
        return scale.to(dtype)

    @torch.no_grad()
    def fold_second_basis(self, weight: torch.Tensor) -> None:
        """Fold the second basis into the first scale before it is dropped (EBB ``fold``).

        Per output channel, ``s_1 + g s_2 <b_1, b_2> / n`` is the least-squares scale of
        the first sign basis for the two-basis weight ``s_1 b_1 + g s_2 b_2``.
        """
        if self.bases < 2 or self._num_active < 2:
            return
        signs = self.signs(weight)
        reduce_dims = tuple(range(1, weight.dim()))
        agreement = (signs[0] * signs[1]).float().mean(dim=reduce_dims, keepdim=True)
        second = self.scales[1] * self.second_basis_gain
        self.scales[0].add_(second * agreement.to(self.scales.dtype))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self._initialized:
            self.initialize(weight)
        residual = weight
        out = None
        for i in range(self.num_active):
            term = self._scale(i, weight.dtype) * sign_ste(residual)
            out = term if out is None else out + term
            residual = residual - term
        return out

    @torch.no_grad()
    def signs(self, weight: torch.Tensor) -> list[torch.Tensor]:
        """The {-1,+1} sign tensor of each active basis (for packing)."""
        residual = weight.detach()
        signs = []
        for i in range(self.num_active):
            b = sign_pm1(residual)
            signs.append(b)
            residual = residual - self._scale(i, weight.dtype) * b
        return signs

    def ebb_penalty(self) -> torch.Tensor:
        """mean(s_2) while the second basis is computed, else 0 (EBB's regulariser term)."""
        if self.num_active < 2:
            return self.scales.new_zeros(())
        return self.scales[1].mean()

    def extra_repr(self) -> str:
        return f"bases={self.bases}, active={self.num_active}"
