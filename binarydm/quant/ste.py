"""Straight-through estimators shared by the quantizers.

``sign_ste`` is the binarizer's sign with sign(0) = +1 (``torch.sign`` gives 0,
which would drop weights from the packed format) and the clipped STE backward:
gradient passes where ``|x| <= 1``. ``round_ste`` and ``grad_scale`` are LSQ's
two tricks (Esser et al. 2019).
"""

from __future__ import annotations

import torch


def sign_pm1(x: torch.Tensor) -> torch.Tensor:
    """Sign in {-1, +1}, with sign(0) = +1."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return sign_pm1(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    return _SignSTE.apply(x)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    # Forward rounds, backward is identity.
    return x + (torch.round(x) - x).detach()


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    # Forward value x, backward gradient multiplied by ``scale``.
    return x * scale + (x - x * scale).detach()
