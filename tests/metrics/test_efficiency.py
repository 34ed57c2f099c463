"""efficiency_report: hand-computed golden numbers, FP invariants and the paper's LDM-4 figures."""

from __future__ import annotations

import copy

import pytest
import torch
from bdm_support import small_unet
from torch import nn

from binarydm import BinaryDMConfig, binarize_
from binarydm.metrics.efficiency import efficiency_report
from binarydm.models import build_unet
from binarydm.quant import MultiBasisBinarizer, quant_layers

_MIB = 2**20


class ConvThenTokens(nn.Module):
    """conv 3->4 (k3, pad 1) on 8x8, then a 4->5 linear on the 64 pixels as tokens.

    ``down_blocks.0.0`` lies in resolution level 0 (one level in all), so a
    ``scope_levels=1`` config gives the conv the extra bases and the linear one basis.
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.down_blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))])
        self.proj = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.down_blocks[0](x)  # (B, 4, 8, 8)
        return self.proj(hidden.flatten(2).transpose(1, 2))  # (B, 64, 5)


# Per sample: conv MACs = 8*8 outputs * 4 c_out * 3 c_in * 3*3 = 6912; linear MACs =
# 64 tokens * 4 * 5 = 1280; total 8192. Params: conv 108 weights + 4 biases, linear 20 + 5:
# 137 params = 548 bytes in FP32.
CONV_MACS, LINEAR_MACS, FP32_BYTES = 6912, 1280, 548


def _golden_inputs(batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 8, 8)


def test_golden_fp_model():
    report = efficiency_report(ConvThenTokens(), _golden_inputs())
    assert [(r.name, r.kind, r.macs) for r in report.layers] == [
        ("down_blocks.0.0", "conv", CONV_MACS),
        ("proj", "linear", LINEAR_MACS),
    ]
    assert report.macs == 8192
    assert report.flops_g == pytest.approx(8192e-9) and report.bops_g == 0
    assert report.ops_g == pytest.approx(8192e-9)
    assert report.size_mib * _MIB == pytest.approx(FP32_BYTES)
    assert report.ops_saving == 1 and report.size_saving == 1


def test_golden_w1a4_one_basis():
    model = binarize_(ConvThenTokens(), BinaryDMConfig.v1(**{"weight.bases": 1}))
    report = efficiency_report(model, _golden_inputs())
    conv, linear = report.layers
    # BOPs = MACs * 1 bit * 4 bits: 27648 + 5120 = 32768; OPs = 32768 / 64 = 512.
    assert (conv.bops, linear.bops) == (27648, 5120)
    assert report.bops_g == pytest.approx(32768e-9) and report.flops_g == 0
    assert report.ops_g == pytest.approx(512e-9)
    assert report.ops_saving == pytest.approx(8192 / 512)  # 16
    # Bits: conv 108 weights*1 + 4 biases*32 + 4 scales*32 + 1 act step*32 = 396;
    # linear 20*1 + 5*32 + 5*32 + 32 = 372. 768 bits = 96 bytes.
    assert (conv.size_bytes * 8, linear.size_bytes * 8) == (396, 372)
    assert report.size_mib * _MIB == pytest.approx(96)
    assert report.size_saving == pytest.approx(FP32_BYTES / 96)  # 5.708


def test_golden_two_bases_in_scope_and_batch_independence():
    config = BinaryDMConfig.v1(**{"weight.bases": 2, "weight.scope_levels": 1})
    model = binarize_(ConvThenTokens(), config)
    report = efficiency_report(model, _golden_inputs(batch=3))
    conv, linear = report.layers
    assert (conv.bases, conv.weight_bits, linear.bases, linear.weight_bits) == (2, 2, 1, 1)
    # conv 6912*2*4 = 55296 BOPs, linear 5120: OPs = 60416 / 64 = 944 (per sample at batch 3).
    assert report.macs == 8192 and report.bops_g == pytest.approx(60416e-9)
    assert report.ops_g == pytest.approx(944e-9)
    # conv 108*2 + 128 bias + 8 scales*32 + 32 step = 632 bits; linear 372: 1004 bits.
    assert report.size_mib * _MIB == pytest.approx(1004 / 8)


def test_golden_w1a32_counts_32_bit_activations_and_no_step():
    config = BinaryDMConfig.v1(**{"weight.bases": 1, "activation.bits": 32})
    report = efficiency_report(binarize_(ConvThenTokens(), config), _golden_inputs())
    # BOPs = 8192 * 1 * 32 = 262144 -> 4096 OPs; an identity act quantizer has no deployed step.
    assert report.ops_g == pytest.approx(4096e-9)
    assert report.size_mib * _MIB == pytest.approx((396 - 32 + 372 - 32) / 8)


def test_golden_w1a4_lsq_plus_counts_one_offset_per_layer_and_no_bops():
    config = BinaryDMConfig.v1(**{"weight.bases": 1, "activation.quantizer": "lsq_plus"})
    report = efficiency_report(binarize_(ConvThenTokens(), config), _golden_inputs())
    conv, linear = report.layers
    # Activation bits stay 4, so BOPs are the LSQ W1A4 ones: 27648 + 5120 = 32768, 512 OPs.
    assert (conv.act_bits, linear.act_bits) == (4, 4)
    assert (conv.bops, linear.bops) == (27648, 5120) and report.ops_g == pytest.approx(512e-9)
    # The W1A4 bits plus one 32-bit offset per layer: conv 396 + 32 = 428, linear 372 + 32 =
    # 404: 832 bits = 104 bytes. The FP32 model has no quantizers, so no offsets: 548 bytes.
    assert (conv.size_bytes * 8, linear.size_bytes * 8) == (428, 404)
    assert report.size_mib * _MIB == pytest.approx(104)
    assert report.fp32_size_mib * _MIB == pytest.approx(FP32_BYTES)
    assert report.size_saving == pytest.approx(FP32_BYTES / 104)
    # At 32 bits LSQ+ is the identity: neither its step nor its offset is deployed.
    off = BinaryDMConfig.v1(
        **{"weight.bases": 1, "activation.bits": 32, "activation.quantizer": "lsq_plus"}
    )
    report_off = efficiency_report(binarize_(ConvThenTokens(), off), _golden_inputs())
    assert report_off.size_mib * _MIB == pytest.approx((396 - 32 + 372 - 32) / 8)


def test_report_leaves_model_state_alone_and_counts_inactive_layers():
    config = BinaryDMConfig().replace(**{"progressive.stage_steps": 10})
    model = binarize_(small_unet(), config)
    layers = dict(quant_layers(model))
    layers["mid_block.resnets.0.conv1"].active = False
    model.train()
    inputs = (torch.randn(2, 3, 16, 16), torch.tensor([1, 2]))
    report = efficiency_report(model, inputs)
    assert model.training and not layers["mid_block.resnets.0.conv1"].active
    # No quantizer saw the example inputs: their one-time init is left to training.
    assert not any(
        bool(layer.act_quantizer.initialized) or bool(layer.weight_quantizer.initialized)
        for layer in layers.values()
    )
    rows = {r.name: r for r in report.layers}
    assert rows["mid_block.resnets.0.conv1"].quantized
    assert report.flops_g == pytest.approx(
        sum(r.macs for r in report.layers if r.name.startswith(("conv_", "time_"))) / 1e9
    )


def test_fp_small_unet_has_unit_savings():
    model = small_unet()
    report = efficiency_report(model, (torch.randn(2, 3, 16, 16), torch.tensor([5, 9])))
    assert report.ops_saving == 1 and report.size_saving == 1 and report.bops_g == 0
    assert report.size_mib * _MIB == 4 * sum(p.numel() for p in model.parameters())
    assert set(report.to_dict()) == {
        "macs",
        "flops_g",
        "bops_g",
        "ops_g",
        "size_mib",
        "weight_bits",
        "ops_saving",
        "size_saving",
    }
    assert report.weight_bits == 32.0  # nothing quantized


# -- the paper's LDM-4 LSUN-Bedrooms figures (method.md section 7) -------------------------
# (size MiB, OPs G) from the paper; "MB" there is MiB: 274,056,163 params * 4 B = 1045.4 MiB.
PAPER_LDM4 = {
    "fp": (1045.4, 96.0),
    "w4a4": (134.9, 24.3),
    "w2a4": (69.8, 12.3),
    "w1a4": (35.8, 6.3),
    "two_bases_everywhere": (70.2, 12.6),
}
SIZE_TOLERANCE, OPS_TOLERANCE = 0.03, 0.05
W1A4_SIZE_TOLERANCE = 0.05

_LDM4_CONFIGS = {
    "w4a4": {"weight.kind": "lsq", "weight.bits": 4},
    "w2a4": {"weight.kind": "lsq", "weight.bits": 2},
    "w1a4": {"weight.bases": 1},
    "two_bases_scope4": {"weight.bases": 2, "weight.scope_levels": 4},
}


def _ldm4_inputs(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(1, 3, 64, 64, device=device), torch.tensor([500], device=device)


@pytest.fixture(scope="module")
def ldm4_reports() -> dict:
    # The report reads only shapes (hooks see output sizes, quantizers stay off), so the
    # 274M-param model is built on the meta device: no memory, no init, a shape-only
    # forward; test_meta_device_report_equals_cpu_report checks that this is exact.
    # binarize_ runs outside the meta context: quantizer buffers (basis counts) must
    # stay readable on CPU.
    with torch.device("meta"):
        fp = build_unet("ldm4-bedroom")
    inputs = _ldm4_inputs("meta")
    reports = {"fp": efficiency_report(fp, inputs)}
    for name, overrides in _LDM4_CONFIGS.items():
        model = binarize_(copy.deepcopy(fp), BinaryDMConfig.v1(**overrides))
        reports[name] = efficiency_report(model, inputs)
        if name == "w1a4":
            reports["quantized_weights"] = sum(m.weight.numel() for _, m in quant_layers(model))
        if name == "two_bases_scope4":
            _give_mid_block_two_bases(model)
            reports["two_bases_everywhere"] = efficiency_report(model, inputs)
    return reports


def _give_mid_block_two_bases(model: nn.Module) -> None:
    # scope_levels covers resolution levels only (method.md keeps the mid block at one
    # basis), so the paper's "everywhere" needs the mid block's binarizers replaced.
    for _, layer in quant_layers(model):
        if layer.weight_quantizer.bases == 1:
            layer.weight_quantizer = MultiBasisBinarizer(layer.weight.shape, 2)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"weight.kind": "lsq", "weight.bits": 4}, {"activation.quantizer": "lsq_plus"}],
)
def test_meta_device_report_equals_cpu_report(overrides):
    config = BinaryDMConfig.v1(**overrides)
    cpu = efficiency_report(
        binarize_(small_unet(), config), (torch.randn(2, 3, 16, 16), torch.tensor([3, 4]))
    )
    with torch.device("meta"):
        meta_model = small_unet()
        meta_inputs = (torch.randn(2, 3, 16, 16), torch.tensor([3, 4]))
    meta = efficiency_report(binarize_(meta_model, config), meta_inputs)
    assert meta == cpu


@pytest.mark.slow
def test_ldm4_w1a4_report_on_cpu_equals_meta(ldm4_reports):
    """The full-size model on CPU, one real forward (tens of seconds on 2 cores)."""
    model = binarize_(build_unet("ldm4-bedroom"), BinaryDMConfig.v1(**{"weight.bases": 1}))
    assert efficiency_report(model, _ldm4_inputs("cpu")) == ldm4_reports["w1a4"]


def test_ldm4_fp_matches_paper_exactly(ldm4_reports):
    report = ldm4_reports["fp"]
    assert report.macs == 96_017_969_152  # paper: 96.0 G, so attention matmuls are not counted
    assert report.size_mib == pytest.approx(1045.4, abs=0.05)


@pytest.mark.parametrize("name", ["w4a4", "w2a4", "two_bases_everywhere"])
def test_ldm4_quantized_matches_paper(ldm4_reports, name):
    """Measured: W4A4 135.05 MiB / 24.04 G, W2A4 69.99 / 12.05, two bases 70.35 / 12.05.

    Our OPs are 0.25-0.55 G below the paper's in every row (1-4.4%): eq. 16-17 applied to
    conv/linear MACs gives exactly 96.0 G for FP but leaves no FP work in a quantized
    model besides conv_in/conv_out and the time MLP (0.05 G); the paper counts some
    extra FP ops it does not describe, so OPs get a 5% tolerance, sizes 3%.
    """
    size, ops = PAPER_LDM4[name]
    report = ldm4_reports[name]
    assert report.size_mib == pytest.approx(size, rel=SIZE_TOLERANCE)
    assert report.ops_g == pytest.approx(ops, rel=OPS_TOLERANCE)


def test_ldm4_w1a4_against_paper(ldm4_reports):
    """Measured 37.46 MiB / 6.05 G OPs (paper 35.8 MiB / 6.3 G, 29.2x / 15.2x).

    The paper's W1A4 size cannot be matched within 3% by any accounting in which W1
    and W2 differ only in weight bits: its W2A4 - W1A4 gap is 69.8 - 35.8 = 34.0 MiB,
    but one bit less on each of the 272.86 M quantized weights saves only 32.53 MiB
    (even all 274.06 M params give 32.67). Our W2A4 matches to 0.3%, so the size
    check here is 5% and the gap is asserted to be exactly the weight bits.
    """
    w1, w2 = ldm4_reports["w1a4"], ldm4_reports["w2a4"]
    size, ops = PAPER_LDM4["w1a4"]
    assert w1.size_mib == pytest.approx(size, rel=W1A4_SIZE_TOLERANCE)
    assert w1.ops_g == pytest.approx(ops, rel=OPS_TOLERANCE)
    assert w1.ops_saving == pytest.approx(15.2, rel=OPS_TOLERANCE)
    assert ldm4_reports["quantized_weights"] == 272_857_088
    gap_mib = ldm4_reports["quantized_weights"] / 8 / _MIB
    assert w2.size_mib - w1.size_mib == pytest.approx(gap_mib, abs=1e-9)
    assert gap_mib == pytest.approx(32.53, abs=0.01)


def test_ldm4_scope_levels_4_keeps_mid_block_at_one_basis(ldm4_reports):
    """With ``scope_levels=4`` the mid block keeps one basis: 66.30 MiB / 11.92 G OPs.

    That is 5.6% / 5.4% under the paper's "two bases everywhere", hence the mid-block
    swap above for the paper comparison.
    """
    scoped, everywhere = ldm4_reports["two_bases_scope4"], ldm4_reports["two_bases_everywhere"]
    assert scoped.size_mib == pytest.approx(66.30, abs=0.01)
    assert scoped.ops_g == pytest.approx(11.918, abs=0.001)
    assert everywhere.size_mib == pytest.approx(70.35, abs=0.01)
    assert everywhere.ops_g == pytest.approx(12.046, abs=0.001)
    mid = [r for r in scoped.layers if r.name.startswith("mid_block") and r.quantized]
    assert mid and all(r.bases == 1 for r in mid)
