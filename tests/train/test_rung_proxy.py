"""The early-stopping rung's proxies: the small FID is the trial's FID pipeline at a small
size (same sampler, seed, Inception), the held-out loss the final one's."""

from __future__ import annotations

import pytest
import torch
from bdm_support import small_unet, tiny_settings

from binarydm.train._diffusion import ddim_sample, held_out_loss, noise_scheduler, to_uint8
from binarydm.train._evaluate import _test_images, rung_proxy, score_fid


def test_small_fid_proxy_equals_the_fid_of_that_many_samples_and_steps():
    settings = tiny_settings()
    model = small_unet(sample_size=16, channels=1).eval()
    scores = rung_proxy(model, settings, fid=(80, 3))
    assert set(scores) == {"proxy/test_loss", "proxy/fid", "ops_g", "bops_g", "flops_g",
                           "size_mib", "weight_bits", "ops_saving", "size_saving",
                           "timing/proxy_test_loss_s", "timing/proxy_fid_s"}  # fmt: skip
    # Each proxy's cost: 80 samples of 3 DDIM steps plus Inception outweigh one held-out
    # loss pass over the test images (a forward pass each).
    assert 0 < scores["timing/proxy_test_loss_s"] < scores["timing/proxy_fid_s"]

    small = settings.replace(**{"evaluation.fid_samples": 80, "evaluation.sampling_steps": 3})
    with torch.no_grad():
        drawn = ddim_sample(model, 80, steps=3, seed=settings.seed, batch_size=100)
    direct = score_fid(to_uint8(drawn), small, data_root=None, cache_dir=None, device="cpu")
    assert scores["proxy/fid"] == pytest.approx(direct["fid"], rel=1e-6)
    images = _test_images(settings, None, None, settings.evaluation.test_loss_images)
    loss = held_out_loss(model, images, noise_scheduler(1000), seed=1234)
    assert scores["proxy/test_loss"] == pytest.approx(loss, rel=1e-6)
    # Without fid: the test loss alone, no sampling.
    alone = rung_proxy(model, settings)
    assert "proxy/fid" not in alone and "timing/proxy_fid_s" not in alone
    assert alone["timing/proxy_test_loss_s"] > 0
