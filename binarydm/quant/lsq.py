"""LSQ (Esser et al. 2019): learned step size quantization for activations and weights.

The step is initialised ONCE, from the first tensor seen, to ``2*mean(|x|)/sqrt(Qp)``
(per tensor for activations, per output channel for weights), then learned with
gradient scale ``1/sqrt(numel*Qp)``. Under DDP the activation init is averaged over
ranks so every replica starts from the same step.

The arithmetic is fp32 (at least) whatever the input dtype, and the result is cast
back to it. Under CUDA autocast the inputs arrive in bf16: ``x / step`` and the
rounding residual ``round(v) - v`` in bf16 have 8 significant bits, so on SiLU inputs
the summed step gradient was off the fp32 one by a median 6-8% and by 1-3x at worst.
Only the input is saved for backward, in its own dtype (an fp32 copy would double the
activation memory autograd holds); backward upcasts it again.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype fake quantization computes in: fp32, or the input's if wider (float64)."""
    return torch.promote_types(x.dtype, torch.float32)


class _LSQFakeQuant(torch.autograd.Function):
    """LSQ forward and its exact gradients in one function.

    The composed form (divide, clamp, round-STE, multiply, gradient-scale trick) keeps
    several activation-sized intermediates alive for backward; this saves only ``x``
    and recomputes the rest, which is what makes the quantizer cheap on a GPU.
    """

    @staticmethod
    def forward(ctx, x, step, qn: int, qp: int, grad_factor: float):
        ctx.save_for_backward(x, step)  # x in its own dtype (module docstring)
        ctx.bounds = (qn, qp, grad_factor)
        work = compute_dtype(x)
        s = step.to(work)
        return (torch.clamp(torch.round(x.to(work) / s), qn, qp) * s).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, step = ctx.saved_tensors
        qn, qp, grad_factor = ctx.bounds
        work = compute_dtype(x)
        v = x.to(work) / step.to(work)
        inside = (v > qn) & (v < qp)  # a range end counts as clipped (see clip_ste)
        grad_x = torch.where(inside, grad, torch.zeros_like(grad))
        # d q / d s: round(v) - v inside the range, the clipped level outside it.
        ds = torch.where(inside, torch.round(v) - v, torch.clamp(v, qn, qp))
        grad_step = grad.to(work) * ds
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
    ops that ``torch.compile`` can fuse into the neighbouring kernels. The upcast and the
    cast back are ops of the graph too, so the compiled kernel computes in fp32."""
    work = compute_dtype(x)
    s = scale_grad(step.to(work), grad_factor)
    v = clip_ste(x.to(work) / s, qn, qp)
    return ((v + (torch.round(v) - v).detach()) * s).to(x.dtype)


def clip_ste(v: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``clamp(v, low, high)`` passing the gradient strictly inside the range only.

    A value on a range end counts as clipped, as in the LSQ paper's gradient (strict
    inequalities) and in the autograd functions. ``torch.clamp``'s own subgradient at
    the ends is not the same in every release (1 in torch 2.11, 0 in 2.14), so it is
    left out of it.
    """
    inside = (v > low) & (v < high)
    return torch.where(inside, v, v.detach().clamp(low, high))


def scale_grad(param: torch.Tensor, factor: float) -> torch.Tensor:
    """``param`` in value, ``factor * grad`` in backward (LSQ's gradient scale, as plain ops).

    Written as ``param + (scaled - scaled)`` with the detach on the outer terms: adding an
    exact zero keeps the value bit-identical to ``param``, so the composed form clips and
    rounds exactly where the autograd function does (``scaled + (param - scaled)`` is
    off by an ulp and moves values that sit on a range end).
    """
    scaled = param * factor
    return param.detach() + (scaled - scaled.detach())


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

    @property
    def needs_init(self) -> bool:
        """Whether the next forward sets the step from its input (read on the host: no sync)."""
        return self.enabled and not self._initialized

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
        # The fp32 step goes in as is: casting it to a bf16 input's dtype would round it.
        if self.implementation == "composed":
            return lsq_composed(x, self.step, self.qn, self.qp, grad_factor)
        return _LSQFakeQuant.apply(x, self.step, self.qn, self.qp, grad_factor)

    def extra_repr(self) -> str:
        kind = "per-channel" if self.per_channel else "per-tensor"
        return f"bits={self.bits}, signed={self.signed}, {kind}"
