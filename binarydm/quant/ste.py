"""The binarizer's sign and its clipped straight-through estimator.

``sign_ste`` is sign with sign(0) = +1 (``torch.sign`` gives 0, which would drop
weights from the packed format) and the clipped STE backward: the gradient passes
where ``|x| <= 1``. (LSQ's round-STE lives in ``lsq.py``.)
"""

from __future__ import annotations

import torch


def sign_pm1(x: torch.Tensor) -> torch.Tensor:
    """Sign in {-1, +1}, with sign(0) = +1."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """``sign_pm1(x)`` in value; in backward the gradient passes where ``|x| <= 1``.

    Plain differentiable ops, not an ``autograd.Function``: under Dynamo on the GPU
    build (torch 2.11.0+cu130, H200) the function's input got no gradient at all, so a
    compiled student's latent weights never trained (every binarized layer's weight
    gradient off eager's by exactly 100 %, the scales' exact; benchmarks/results/
    gpu_perf.md, issue 18). Written as ``sign + (p - p.detach())`` the value is the sign
    bit for bit (``p - p`` is an exact zero) and autograd keeps only the boolean mask.
    """
    passed = torch.where(x.abs() <= 1, x, x.detach())
    return sign_pm1(x.detach()) + (passed - passed.detach())
