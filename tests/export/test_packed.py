"""Packed checkpoints: bit layout, latent-weight rebuild, save/load round trips (real forwards)."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from bdm_support import small_unet
from safetensors import safe_open
from safetensors.torch import save_file

from binarydm import BinaryDMConfig, binarize_
from binarydm.export import (
    FORMAT_VERSION,
    latent_from_signs,
    load_packed,
    pack_bits,
    save_packed,
    unpack_bits,
)
from binarydm.quant import LSQPlusQuantizer, LSQQuantizer, MultiBasisBinarizer, quant_layers
from binarydm.schedule import apply_schedule


def test_pack_bits_layout_is_lsb_first():
    # Signs + - + + - - - + | + -> bits 1,0,1,1,0,0,0,1 = 1+4+8+128 = 141, then 1.
    signs = torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 1], dtype=torch.uint8)
    assert pack_bits(signs, 1).tolist() == [141, 1]
    # 2-bit codes 3,0,1,2 -> 3 + 0<<2 + 1<<4 + 2<<6 = 147; 4-bit 5,12 -> 5 + 12<<4 = 197.
    assert pack_bits(torch.tensor([3, 0, 1, 2]), 2).tolist() == [147]
    assert pack_bits(torch.tensor([5, 12]), 4).tolist() == [197]


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pack_unpack_round_trip(bits):
    values = torch.randint(0, 2**bits, (1001,), generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(1001 * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, 1001), values.to(torch.uint8))


def test_latent_of_one_positive_basis_is_the_binary_weight():
    scales = torch.rand(6, 1, 1, 1) + 0.1
    signs = torch.where(torch.randn(6, 4, 3, 3) >= 0, 1.0, -1.0)
    assert torch.equal(latent_from_signs([signs], scales[None]), scales * signs)


@pytest.mark.parametrize("bases", [1, 2, 3])
def test_latent_reproduces_signs_under_arbitrary_scales(bases):
    # Unordered and negative scales: w_b itself would not re-binarize to the same signs.
    gen = torch.Generator().manual_seed(bases)
    binarizer = MultiBasisBinarizer((16, 8, 3, 3), bases)
    weight = torch.randn(16, 8, 3, 3, generator=gen)
    binarizer.initialize(weight)
    with torch.no_grad():
        binarizer.scales.mul_(torch.empty(bases, 16, 1, 1, 1).uniform_(-0.5, 3.0, generator=gen))
    signs = binarizer.signs(weight)
    deployed = binarizer(weight)
    # The case the fallback exists for: w_b does not re-binarize to its own signs.
    rebinarized = binarizer.signs(deployed)
    assert any(not torch.equal(a, b) for a, b in zip(rebinarized, signs, strict=True))
    latent = latent_from_signs(signs, binarizer.scales.detach())
    for got, want in zip(binarizer.signs(latent), signs, strict=True):
        assert torch.equal(got, want)
    assert torch.equal(binarizer(latent), deployed)


def test_latent_warns_when_float_resolution_loses_a_sign():
    # s = 1, 1e-9, 1e-9 with signs +, -, +: r_1 must lie in [-1e-9, 0) below 1.0,
    # finer than float32 resolves next to 1.0.
    scales = torch.tensor([1.0, 1e-9, 1e-9]).reshape(3, 1, 1)
    signs = [torch.tensor([[1.0]]), torch.tensor([[-1.0]]), torch.tensor([[1.0]])]
    with pytest.warns(UserWarning, match="1 signs cannot be rebuilt"):
        latent_from_signs(signs, scales, name="probe")


def _inputs():
    gen = torch.Generator().manual_seed(7)
    return torch.randn(2, 3, 16, 16, generator=gen), torch.tensor([3, 700])


def _trained_like(config: BinaryDMConfig) -> torch.nn.Module:
    """A binarized small UNet after init, with every scale and step moved off its init."""
    model = binarize_(small_unet(), config)
    with torch.no_grad():
        model(*_inputs())
        gen = torch.Generator().manual_seed(11)
        for module in model.modules():
            if isinstance(module, MultiBasisBinarizer | LSQQuantizer):
                param = module.scales if isinstance(module, MultiBasisBinarizer) else module.step
                param.mul_(torch.empty(param.shape).uniform_(0.5, 2.0, generator=gen))
            if isinstance(module, LSQPlusQuantizer):
                module.offset.add_(torch.empty(()).uniform_(-0.2, 0.2, generator=gen))
    return model


ROUND_TRIPS = {
    "binary_k1": {"weight.bases": 1},
    "binary_k2_outer2": {"weight.bases": 2, "weight.scope_levels": 2},
    "binary_k3_all_levels": {"weight.bases": 3, "weight.scope_levels": 3},
    "ebb_switched": {"weight.bases": 2, "weight.scope_levels": 3, "ebb.enabled": True},
    "binary_int8_first_last_attn_a8": {
        "first_last": "int8",
        "activation.bits": 8,
        "activation.attention_matmul": True,
    },
    "lsq_w2a4": {"weight.kind": "lsq", "weight.bits": 2},
    "lsq_w4a4": {"weight.kind": "lsq", "weight.bits": 4},
    "lsq_w8a32": {"weight.kind": "lsq", "weight.bits": 8, "activation.bits": 32},
    "lsq_plus_a4_int8_first_last_attn": {
        "activation.quantizer": "lsq_plus",
        "first_last": "int8",
        "activation.attention_matmul": True,
    },
    "lsq_plus_w2a4": {"activation.quantizer": "lsq_plus", "weight.kind": "lsq", "weight.bits": 2},
}


@pytest.mark.parametrize("case", sorted(ROUND_TRIPS))
def test_round_trip_reproduces_outputs_signs_and_scales(case, tmp_path):
    config = BinaryDMConfig.v1(**ROUND_TRIPS[case])
    model = _trained_like(config)
    if config.ebb.enabled:
        apply_schedule(model, config.ebb.switch_step(100), 100)
    model.eval()
    with torch.no_grad():
        expected = model(*_inputs()).sample
    path = save_packed(model, tmp_path / "model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a sign that cannot be rebuilt warns
        loaded = load_packed(path).eval()
    with torch.no_grad():
        got = loaded(*_inputs()).sample
    assert (got - expected).abs().max().item() <= 1e-5
    if config.activation.quantizer == "lsq_plus":
        assert torch.equal(got, expected)  # offsets travel as stored: bit for bit
    assert loaded.binarydm_config == config
    loaded_layers = dict(quant_layers(loaded))
    for name, layer in quant_layers(model):
        twin = loaded_layers[name]
        assert torch.equal(twin.quantized_weight(), layer.quantized_weight()), name
        act, twin_act = layer.act_quantizer, twin.act_quantizer
        assert type(twin_act) is type(act) and twin_act._initialized == act._initialized
        assert torch.equal(twin_act.step, act.step), name
        if isinstance(act, LSQPlusQuantizer):
            assert torch.equal(twin_act.offset, act.offset), name
        quantizer = layer.weight_quantizer
        if isinstance(quantizer, MultiBasisBinarizer):
            active = quantizer.num_active
            assert twin.weight_quantizer.num_active == active
            assert torch.equal(twin.weight_quantizer.scales[:active], quantizer.scales[:active])
            for got_sign, sign in zip(
                twin.weight_quantizer.signs(twin.weight), quantizer.signs(layer.weight), strict=True
            ):
                assert torch.equal(got_sign, sign), name


def test_resaving_a_loaded_model_gives_the_same_tensors(tmp_path):
    config = BinaryDMConfig.v1(**{"weight.bases": 3, "weight.scope_levels": 2})
    first = save_packed(_trained_like(config), tmp_path / "first.safetensors")
    second = save_packed(load_packed(first), tmp_path / "second.safetensors")
    with safe_open(first, "pt") as a, safe_open(second, "pt") as b:
        assert a.metadata() == b.metadata() and set(a.keys()) == set(b.keys())
        for key in a.keys():  # noqa: SIM118
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key


def test_file_holds_one_bit_per_binary_weight(tmp_path):
    model = _trained_like(BinaryDMConfig.v1(**{"weight.bases": 2, "weight.scope_levels": 1}))
    path = save_packed(model, tmp_path / "model.safetensors")
    with safe_open(path, "pt") as reader:
        meta = reader.metadata()
        manifest = json.loads(meta["layers"])
        keys = set(reader.keys())
        for name, layer in quant_layers(model):
            bases = layer.weight_quantizer.num_active
            assert manifest[name] == {"kind": "binary", "shape": list(layer.weight.shape),
                                      "bases": bases}  # fmt: skip
            assert f"{name}.weight" not in keys
            for i in range(bases):
                packed = reader.get_tensor(f"{name}.weight.signs.{i}")
                assert packed.dtype == torch.uint8
                assert packed.numel() == math.ceil(layer.weight.numel() / 8)
    assert meta["format_version"] == str(FORMAT_VERSION)
    assert json.loads(meta["diffusers_config"])["_class_name"] == "UNet2DModel"


def test_refuses_fp_and_uninitialised_models(tmp_path):
    with pytest.raises(ValueError, match="not binarized"):
        save_packed(small_unet(), tmp_path / "fp.safetensors")
    with pytest.raises(ValueError, match="run one forward"):
        save_packed(binarize_(small_unet()), tmp_path / "fresh.safetensors")


def test_refuses_newer_format_and_foreign_files(tmp_path):
    path = save_packed(_trained_like(BinaryDMConfig()), tmp_path / "model.safetensors")
    with safe_open(path, "pt") as reader:
        tensors = {key: reader.get_tensor(key) for key in reader.keys()}  # noqa: SIM118
        metadata = reader.metadata()
    newer = tmp_path / "newer.safetensors"
    save_file(tensors, newer, {**metadata, "format_version": str(FORMAT_VERSION + 1)})
    with pytest.raises(ValueError, match="upgrade binarydm"):
        load_packed(newer)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="not a binarydm-packed file"):
        load_packed(foreign)
