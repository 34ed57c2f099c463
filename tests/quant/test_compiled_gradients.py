"""The binarized student under torch.compile: the sign STE's values and gradients, and a
compiled forward's gradients against eager's for every parameter (the GPU build once gave
the binarized layers' latent weights no gradient at all under Dynamo)."""

from __future__ import annotations

import copy

import pytest
import torch
from bdm_support import small_unet

from binarydm import BinaryDMConfig, binarize_
from binarydm.quant import (
    ActivationQuantConfig,
    LSQPlusQuantizer,
    LSQQuantizer,
    sign_pm1,
    sign_ste,
    use_composed_quantizers_,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sign_ste_is_the_sign_bit_for_bit_with_the_clipped_gradient(dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(4096, generator=gen) * 1.5).to(dtype)
    x[:4] = torch.tensor([0.0, -0.0, 1.0, -1.0])
    x.requires_grad_(True)
    upstream = torch.randn(4096, generator=gen).to(dtype)
    out = sign_ste(x)
    (out * upstream).sum().backward()
    assert out.dtype == dtype and torch.equal(out, sign_pm1(x.detach()))
    expected = torch.where(x.detach().abs() <= 1, upstream, torch.zeros_like(upstream))
    assert torch.equal(x.grad, expected)
    assert x.grad[2] == upstream[2] and x.grad[3] == upstream[3]  # |x| = 1 passes


def _student(quantizer: str) -> torch.nn.Module:
    config = BinaryDMConfig(activation=ActivationQuantConfig(bits=4, quantizer=quantizer))
    student = binarize_(small_unet(), config)
    torch.manual_seed(1)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 700])
    student(x, t).sample.sum().backward()  # eager: initialises the quantizers
    student.zero_grad(set_to_none=True)
    return student


def _grads(model, forward) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(2)
    x, t, noise = torch.randn(2, 3, 16, 16), torch.tensor([20, 500]), torch.randn(2, 3, 16, 16)
    loss = torch.nn.functional.mse_loss(forward(x, t).sample, noise)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_composed_quantizers_switch_only_the_given_model():
    student, other = _student("lsq"), _student("lsq_plus")
    count = sum(isinstance(m, (LSQQuantizer, LSQPlusQuantizer)) for m in student.modules())
    assert count > 10 and use_composed_quantizers_(student) == count
    assert {m.implementation for m in student.modules() if isinstance(m, LSQQuantizer)} == {
        "composed"
    }
    assert all(m.implementation == "function" for m in other.modules() if hasattr(m, "bits"))
    assert use_composed_quantizers_(student) == 0  # already switched


@pytest.mark.parametrize("quantizer", ["lsq", "lsq_plus"])
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_student_has_eager_gradients_for_every_parameter(quantizer, backend):
    student = _student(quantizer)
    eager_loss, eager = _grads(student, student)  # the autograd functions, eager
    composed = copy.deepcopy(student)
    use_composed_quantizers_(composed)  # as the training loop does before compiling
    _, composed_eager = _grads(composed, composed)
    torch._dynamo.reset()
    loss, compiled = _grads(composed, torch.compile(composed, backend=backend))
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=0)
    assert compiled.keys() == eager.keys()
    latent = [n for n in eager if n.endswith(".weight") and "_quantizer" not in n]
    binarized = [n for n in latent if f"{n[: -len('.weight')]}.weight_quantizer.scales" in eager]
    assert len(binarized) > 10
    for name in binarized:  # the STE passes a gradient to every binarized latent weight
        assert compiled[name].abs().sum() > 0, name
    for name, grad in eager.items():
        # Compiled against the same ops eagerly: equal; against the functions: equal but for
        # fp32 reassociation (at most 3.6e-7 here, on gradients of norm 0.1-0.6; the key
        # biases' exactly-zero gradients are that noise, whatever their relative error).
        torch.testing.assert_close(compiled[name], composed_eager[name], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(compiled[name], grad, rtol=1e-5, atol=1e-6, msg=name)
