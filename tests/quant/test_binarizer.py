"""Binarizer numerics: forward vs a direct reference, clipped STE, scale init, EBB."""

from __future__ import annotations

import pytest
import torch

from binarydm.quant import MultiBasisBinarizer, sign_pm1, sign_ste


def reference_binarize(w: torch.Tensor, scales: list[torch.Tensor]) -> torch.Tensor:
    """The method.md recurrence written out directly, one basis at a time."""
    residual, out = w.clone(), torch.zeros_like(w)
    for s in scales:
        b = torch.where(residual >= 0, 1.0, -1.0)
        out += s * b
        residual -= s * b
    return out


@pytest.mark.parametrize("bases", [1, 2, 3])
def test_forward_matches_reference_and_init(bases):
    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3) * 0.1
    binarizer = MultiBasisBinarizer(w.shape, bases)
    out = binarizer(w)
    # Scales initialised once to mean|r_{i-1}| per output channel.
    residual, expected_scales = w.clone(), []
    for _ in range(bases):
        s = residual.abs().mean(dim=(1, 2, 3), keepdim=True)
        expected_scales.append(s)
        residual -= s * torch.where(residual >= 0, 1.0, -1.0)
    for i, s in enumerate(expected_scales):
        torch.testing.assert_close(binarizer.scales[i], s)
    torch.testing.assert_close(out, reference_binarize(w, expected_scales), rtol=0, atol=1e-7)
    # Each extra basis lowers the reconstruction error.
    assert bool(binarizer.initialized)


def test_more_bases_reduce_error():
    torch.manual_seed(1)
    w = torch.randn(8, 8)
    errors = [((MultiBasisBinarizer(w.shape, k)(w) - w) ** 2).mean().item() for k in (1, 2, 3)]
    assert errors[0] > errors[1] > errors[2]


def test_init_happens_once():
    w = torch.randn(4, 3)
    binarizer = MultiBasisBinarizer(w.shape, 2)
    binarizer(w)
    first = binarizer.scales.detach().clone()
    binarizer(w * 10)  # a later forward must not re-initialise
    torch.testing.assert_close(binarizer.scales.detach(), first)


def test_sign_of_zero_is_plus_one():
    assert sign_pm1(torch.tensor([0.0, -0.0, 1e-9, -1e-9])).tolist() == [1.0, 1.0, 1.0, -1.0]


def test_clipped_ste_gradient():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5], requires_grad=True)
    sign_ste(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def test_scale_gradient_is_sum_of_signs_times_upstream():
    # d(s*sign(w))/ds = sign(w): autograd through the custom sign gives the paper's gradient.
    w = torch.tensor([[0.3, -0.2, 0.1]])
    binarizer = MultiBasisBinarizer(w.shape, 1)
    binarizer(w).sum().backward()
    assert binarizer.scales.grad.flatten().tolist() == [1.0]  # +1 -1 +1


def test_weight_gradient_zero_outside_clip_range():
    w = torch.tensor([[3.0, 0.5, -0.25, -2.0]], requires_grad=True)
    binarizer = MultiBasisBinarizer(w.shape, 1)
    binarizer(w).sum().backward()
    s = binarizer.scales.detach().item()
    assert w.grad.flatten().tolist() == [0.0, pytest.approx(s), pytest.approx(s), 0.0]


def test_ebb_switch_leaves_exactly_one_basis():
    torch.manual_seed(2)
    w = torch.randn(5, 7)
    binarizer = MultiBasisBinarizer(w.shape, 2)
    binarizer(w)
    assert binarizer.ebb_penalty().item() == pytest.approx(binarizer.scales[1].mean().item())
    binarizer.set_active_bases(1)
    out = binarizer(w)
    torch.testing.assert_close(out, binarizer.scales[0] * sign_pm1(w), rtol=0, atol=0)
    assert binarizer.ebb_penalty().item() == 0.0
    assert int(binarizer.state_dict()["active_bases"]) == 1
