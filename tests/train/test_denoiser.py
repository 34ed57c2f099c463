"""Sampling's denoising step: eager by default, compiled (inductor) at a fixed batch on request.

The compiled comparison is slow (inductor's CPU build of even a 2-level UNet takes
minutes on the 2-core CI machine); what needs no compilation is checked fast.
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from bdm_support import micro_unet

from binarydm import BinaryDMConfig, binarize_
from binarydm.quant import LSQQuantizer, quant_layers
from binarydm.train._denoiser import Denoiser
from binarydm.train._diffusion import ddim_sample

#: Compiled vs eager samples in [-1, 1] after 3 DDIM steps, every model call at the same
#: batch shape on both sides: inductor fuses and reorders float32 arithmetic, so they agree
#: to rounding, not bit for bit (measured: at most 1.7e-6 over 7 images of this model). A
#: step that binarized the latent weights, which this test negates, is off by order 1.
SAMPLE_ATOL = 1e-4


def _frozen_student():
    student = binarize_(micro_unet(), BinaryDMConfig()).eval()
    with torch.no_grad():
        student(torch.randn(2, 1, 8, 8), torch.tensor([10, 900]))  # initialise quantizers
    for _, layer in quant_layers(student):
        layer.freeze_weights()
    return student


def test_compiled_step_refuses_an_unfrozen_student_and_bad_arguments():
    student = binarize_(micro_unet(), BinaryDMConfig()).eval()
    with pytest.raises(ValueError, match=r"quantized layers .* are not frozen.*freeze_weights"):
        Denoiser(student, 4, compile="default")
    with pytest.raises(ValueError, match=r"compile='fast' is invalid: allowed none, default"):
        Denoiser(student, 4, compile="fast")
    with pytest.raises(ValueError, match=r"batch_size=0 must be at least 1"):
        Denoiser(student, 0)
    eager = Denoiser(student, 2)  # eager sampling reads whatever the layers hold
    with pytest.raises(ValueError, match=r"a batch of 3 images exceeds batch_size=2"):
        eager(torch.zeros(3, 1, 8, 8), torch.tensor(10))
    assert eager.compile_s == 0.0


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None,
    reason="inductor's CPU backend needs a C++ compiler (no g++ or c++ on PATH)",
)
def test_compiled_sampling_matches_eager_and_reads_the_frozen_weights():
    """inductor (mode default) vs eager, 5 images at batch 2: the compiled sampler pads its
    last batch of 1 to 2. The eager reference draws a 6th image so that its last call is
    at batch 2 too: a 4-bit activation quantizer turns a rounding difference that lands
    on a level boundary into a different level, and the eager sampler itself changes an
    image that way between batch sizes (measured: up to 0.63 on image 5 of 5 between
    batches of 1 and 5, noise identical). The latent weights are negated after freezing,
    so only a step that reads the frozen weights reproduces the eager samples."""
    student = _frozen_student()
    options = dict(steps=3, seed=7, batch_size=2)
    with torch.no_grad():
        eager = ddim_sample(student, 6, **options)[:5]  # the same noise for the first 5
        for _, layer in quant_layers(student):
            layer.weight.neg_()
        timings: dict[str, float] = {}
        compiled = ddim_sample(student, 5, compile="default", timings=timings, **options)
    assert compiled.shape == eager.shape == (5, 1, 8, 8)
    assert (compiled - eager).abs().max().item() < SAMPLE_ATOL
    assert timings["compile_s"] > 0
    # A quantizer first reached while sampling (a layer switched on at an early rung) sets
    # its step from the first, unpadded batch, as the eager sampler does.
    fresh = [copy.deepcopy(student) for _ in range(2)]
    for model in fresh:
        quantizer = next(m for m in model.modules() if isinstance(m, LSQQuantizer))
        quantizer._initialized = False
    with torch.no_grad():
        eager = ddim_sample(fresh[0], 6, **options)[:5]
        compiled = ddim_sample(fresh[1], 5, compile="default", **options)
    steps = [
        next(m for m in model.modules() if isinstance(m, LSQQuantizer)).step for model in fresh
    ]
    assert torch.equal(steps[0], steps[1])
    assert (compiled - eager).abs().max().item() < SAMPLE_ATOL
