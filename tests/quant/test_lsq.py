"""LSQ: signed/unsigned ranges, init once, learned step, gradient scale."""

from __future__ import annotations

import math

import pytest
import torch

from binarydm.quant import LSQQuantizer


def test_init_once_and_step_moves_after_optimizer_step():
    torch.manual_seed(0)
    x = torch.randn(4, 16, 8, 8)
    q = LSQQuantizer(4)
    q(x)
    expected = 2 * x.abs().mean() / math.sqrt(7)
    assert q.step.item() == pytest.approx(expected.item(), rel=1e-6)
    q(x * 100)  # re-initialising here was the official code's bug
    assert q.step.item() == pytest.approx(expected.item(), rel=1e-6)
    opt = torch.optim.SGD(q.parameters(), lr=0.1)
    loss = ((q(x) - x) ** 2).sum()
    loss.backward()
    assert q.step.grad is not None and q.step.grad.abs().item() > 0
    before = q.step.item()
    opt.step()
    assert q.step.item() != before


def test_quantized_values_on_the_grid():
    q = LSQQuantizer(4)
    q(torch.linspace(-1, 1, 101))  # step = 2*0.5/sqrt(7)
    x = torch.linspace(-30, 30, 1001)  # far beyond the range: clipped to [-8, 7]
    out = q(x)
    codes = out / q.step
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-5)
    assert codes.min().item() == -8 and codes.max().item() == 7


def test_unsigned_range_and_identity_at_32_bits():
    probs = torch.rand(2, 5, 5)
    q = LSQQuantizer(4, signed=False)
    codes = (q(probs) / q.step).round()
    assert codes.min().item() >= 0 and codes.max().item() <= 15
    off = LSQQuantizer(32)
    assert off(probs) is probs


def test_gradient_scale_applied():
    x = torch.randn(1000)
    q = LSQQuantizer(8)
    q(x)
    q.step.grad = None
    out = q(x)
    out.sum().backward()
    # LSQ step gradient: sum over elements of (round(v)-v) inside range, +-Q at clip, times g.
    s = q.step.detach()
    v = x / s
    inside = (v > -128) & (v < 127)
    raw = torch.where(inside, v.round() - v, v.clamp(-128, 127))
    g = 1 / math.sqrt(x.numel() * 127)
    assert q.step.grad.item() == pytest.approx((raw.sum() * g).item(), rel=1e-4, abs=1e-6)


def test_per_channel_weight_steps():
    w = torch.randn(6, 3, 3, 3)
    w[0] *= 10
    q = LSQQuantizer(2, channel_shape=(6, 1, 1, 1))
    q(w)
    expected = 2 * w.abs().mean(dim=(1, 2, 3)) / math.sqrt(1)
    torch.testing.assert_close(q.step.flatten(), expected)


@pytest.mark.parametrize("channel_shape", [None, (6, 1, 1, 1)])
def test_composed_implementation_matches_the_autograd_function(channel_shape, monkeypatch):
    """``lsq_composed`` (the torch.compile-friendly form) has the same values and gradients."""
    torch.manual_seed(0)
    x = torch.randn(6, 3, 5, 5) * 2
    results = []
    for implementation in ("function", "composed"):
        monkeypatch.setattr(LSQQuantizer, "implementation", implementation)
        q = LSQQuantizer(4, channel_shape=channel_shape)
        q(x)  # initialise
        xi = x.clone().requires_grad_(True)
        out = q(xi)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        results.append((out.detach(), xi.grad, q.step.grad))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
