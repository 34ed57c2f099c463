"""The binarizer's sign and its clipped straight-through estimator.

``sign_ste`` is sign with sign(0) = +1 (``torch.sign`` gives 0, which would drop
weights from the packed format) and the clipped STE backward: the gradient passes
where ``|x| <= 1``. (LSQ's round-STE lives in ``lsq.py`` as one autograd function.)
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
