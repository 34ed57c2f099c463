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


class _LSQFakeQuant(torch.autograd.Function):
    """LSQ forward and its exact gradients in one function.

    The composed form (divide, clamp, round-STE, multiply, gradient-scale trick) keeps
    several activation-sized intermediates alive for backward; this saves only ``x``
    and recomputes the rest, which is what makes the quantizer cheap on a GPU.
    """

    @staticmethod
    def forward(ctx, x, step, qn: int, qp: int, grad_factor: float):
        ctx.save_for_backward(x, step)
        ctx.bounds = (qn, qp, grad_factor)
        return torch.clamp(torch.round(x / step), qn, qp) * step

    @staticmethod
    def backward(ctx, grad):
        x, step = ctx.saved_tensors
        qn, qp, grad_factor = ctx.bounds
        v = x / step
        inside = (v >= qn) & (v <= qp)
        grad_x = torch.where(inside, grad, torch.zeros_like(grad))
        # d q / d s: round(v) - v inside the range, the clipped level outside it.
        ds = torch.where(inside, torch.round(v) - v, torch.clamp(v, qn, qp))
        grad_step = grad.float() * ds.float()
        if step.dim() == 0:
            grad_step = grad_step.sum()
        else:  # per-output-channel steps of weights: reduce all but dim 0
            grad_step = grad_step.sum(dim=tuple(range(1, x.dim())), keepdim=True)
        return (
            grad_x,
            (grad_step * grad_factor).to(step.dtype).reshape(step.shape),
            None,
            None,
            None,
        )


def lsq_composed(x, step, qn: int, qp: int, grad_factor: float) -> torch.Tensor:
    """The same LSQ as ``_LSQFakeQuant`` written as differentiable ops (gradient-scale and
    round-STE by ``detach``): more activation-sized tensors kept in eager mode, but plain
    ops that ``torch.compile`` can fuse into the neighbouring kernels."""
    scaled = step * grad_factor
    s = scaled + (step - scaled).detach()
    v = torch.clamp(x / s, qn, qp)
    return (v + (torch.round(v) - v).detach()) * s


class LSQQuantizer(nn.Module):
    """Fake-quantizes a tensor to ``bits`` with a learned step; ``bits >= 32`` is identity."""

    #: ``_LSQFakeQuant`` (one autograd function, least memory) or ``lsq_composed``.
    implementation = "function"
    #: Python mirrors of buffers (read in forward without a GPU sync); copies of this
    #: quantizer's state (the EMA) must copy them too.
    host_mirrors = ("_initialized",)

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
        self._initialized = False  # Python mirror: no GPU sync per forward

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
        self._initialized = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initialized = bool(self.initialized)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if not self._initialized:
            self.initialize(x)
        per_step = x[0].numel() if self.per_channel else x.numel()
        grad_factor = 1.0 / math.sqrt(per_step * self.qp)
        step = self.step.to(x.dtype)
        if self.implementation == "composed":
            return lsq_composed(x, step, self.qn, self.qp, grad_factor)
        return _LSQFakeQuant.apply(x, step, self.qn, self.qp, grad_factor)

    def extra_repr(self) -> str:
        kind = "per-channel" if self.per_channel else "per-tensor"
        return f"bits={self.bits}, signed={self.signed}, {kind}"
