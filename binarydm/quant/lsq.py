"""LSQ (Esser et al. 2019): learned step size quantization for activations and weights.

The step is initialised ONCE, from the first tensor seen, to ``2*mean(|x|)/sqrt(Qp)``
(per tensor for activations, per output channel for weights), then learned with
gradient scale ``1/sqrt(numel*Qp)``. Under DDP the activation init is averaged over
ranks so every replica starts from the same step.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from binarydm.quant.ste import grad_scale, round_ste


class LSQQuantizer(nn.Module):
    """Fake-quantizes a tensor to ``bits`` with a learned step; ``bits >= 32`` is identity."""

    def __init__(
        self,
        bits: int,
        *,
        signed: bool = True,
        channel_shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        self.bits = bits
        self.signed = signed
        if signed:
            self.qn, self.qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        else:
            self.qn, self.qp = 0, 2**bits - 1
        # channel_shape set: per-output-channel steps (weights), else one step per tensor.
        self.per_channel = channel_shape is not None
        self.step = nn.Parameter(torch.ones(channel_shape if channel_shape else ()))
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def enabled(self) -> bool:
        return self.bits < 32

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if self.per_channel:
            mean_abs = x.abs().mean(dim=tuple(range(1, x.dim())), keepdim=True)
        else:
            mean_abs = x.abs().mean()
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(mean_abs)
                mean_abs /= dist.get_world_size()
        step = 2 * mean_abs / math.sqrt(self.qp)
        self.step.copy_(step.clamp_min(1e-8).reshape(self.step.shape))
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if not bool(self.initialized):
            self.initialize(x)
        per_step = x[0].numel() if self.per_channel else x.numel()
        step = grad_scale(self.step, 1.0 / math.sqrt(per_step * self.qp)).to(x.dtype)
        return round_ste(torch.clamp(x / step, self.qn, self.qp)) * step

    def extra_repr(self) -> str:
        kind = "per-channel" if self.per_channel else "per-tensor"
        return f"bits={self.bits}, signed={self.signed}, {kind}"
