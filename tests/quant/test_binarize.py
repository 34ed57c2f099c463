"""binarize_ on a diffusers UNet: layer rules, basis scope, stages, state-dict round trip."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from bdm_support import small_unet
from torch import nn

from binarydm import BinaryDMConfig, binarize_
from binarydm.quant import (
    ConfigError,
    LSQPlusQuantizer,
    LSQQuantizer,
    MultiBasisBinarizer,
    QuantAttnProcessor,
    QuantMixin,
    quant_layers,
)
from binarydm.schedule import active_stage, apply_schedule


def _inputs(channels=3, size=16, batch=2):
    torch.manual_seed(123)
    return torch.randn(batch, channels, size, size), torch.tensor([10, 700])[:batch]


def test_layer_rules_and_basis_scope():
    model = binarize_(small_unet(), BinaryDMConfig())  # 2 bases in the outer 2 levels
    names = dict(quant_layers(model))
    # FP: time embedding, first and last conv.
    assert not any(n.startswith("time_embedding") for n in names)
    assert "conv_in" not in names and "conv_out" not in names
    assert type(model.conv_in) is nn.Conv2d and type(model.time_embedding.linear_1) is nn.Linear
    # Every other conv/linear is quantized: none of plain type left inside the blocks.
    plain = [
        n
        for n, m in model.named_modules()
        if type(m) in (nn.Conv2d, nn.Linear)
        and n.startswith(("down_blocks", "up_blocks", "mid_block"))
    ]
    assert plain == []
    bases = {n: layer.weight_bits for n, layer in names.items()}
    assert bases["down_blocks.0.resnets.0.conv1"] == 2
    assert bases["down_blocks.1.attentions.0.to_q"] == 2
    assert bases["down_blocks.2.resnets.0.conv1"] == 1
    assert bases["up_blocks.0.resnets.0.conv1"] == 1  # mirrored innermost level
    assert bases["up_blocks.1.resnets.0.conv_shortcut"] == 2
    assert bases["up_blocks.2.resnets.0.time_emb_proj"] == 2
    assert bases["mid_block.resnets.0.conv1"] == 1
    assert {layer.act_bits for layer in names.values()} == {4}
    assert len(names) == 64 - 4  # all convs/linears but conv_in, conv_out, time MLP (2)


def test_scope_zero_and_full():
    none = binarize_(small_unet(), BinaryDMConfig.v1(**{"weight.scope_levels": 0}))
    assert {layer.weight_bits for _, layer in quant_layers(none)} == {1}
    full = binarize_(small_unet(), BinaryDMConfig().replace(**{"weight.scope_levels": 3}))
    bits = {n: layer.weight_bits for n, layer in quant_layers(full)}
    assert bits["mid_block.resnets.0.conv1"] == 1  # the mid block always keeps 1 basis
    assert bits["down_blocks.2.resnets.0.conv1"] == 2


def test_first_last_int8_and_lsq_weights():
    cfg = BinaryDMConfig.v1(**{"first_last": "int8", "weight.kind": "lsq", "weight.bits": 4})
    model = binarize_(small_unet(), cfg)
    layers = dict(quant_layers(model))
    assert layers["conv_in"].weight_bits == 8 and layers["conv_in"].act_bits == 8
    assert layers["down_blocks.0.resnets.0.conv1"].weight_bits == 4
    x, t = _inputs()
    out = model(x, t).sample
    assert torch.isfinite(out).all()


def test_lsq_plus_quantizes_every_body_layer_input():
    cfg = BinaryDMConfig.v1(
        **{
            "activation.quantizer": "lsq_plus",
            "activation.attention_matmul": True,
            "first_last": "int8",
            "progressive.stage_steps": 0,
        }
    )
    model = binarize_(small_unet(), cfg)
    layers = dict(quant_layers(model))
    first_last = {"conv_in", "conv_out"}
    for name, layer in layers.items():
        quantizer = layer.act_quantizer
        if name in first_last:  # the 8-bit first/last layers keep signed LSQ
            assert type(quantizer) is LSQQuantizer and quantizer.signed and quantizer.bits == 8
        else:
            assert isinstance(quantizer, LSQPlusQuantizer) and quantizer.bits == 4, name
    processors = [m for m in model.modules() if isinstance(m, QuantAttnProcessor)]
    assert processors and all(
        type(q) is LSQQuantizer for p in processors for q in p.children()
    )  # attention matmuls stay LSQ
    x, t = _inputs()
    out = model(x, t).sample
    assert torch.isfinite(out).all()
    plus = [layer.act_quantizer for name, layer in layers.items() if name not in first_last]
    assert all(q._initialized for q in plus)
    assert any(q.offset.item() < 0 for q in plus)  # SiLU inputs: the grid starts below 0
    out.square().mean().backward()
    assert all(q.offset.grad is not None and torch.isfinite(q.offset.grad) for q in plus)
    # State dict round trip: offsets and init flags travel, nothing re-initialises.
    with torch.no_grad():
        for q in plus:
            q.offset.sub_(0.05)
            q.step.mul_(1.1)
        expected = model(x, t).sample
    state = model.state_dict()
    assert sum(key.endswith("act_quantizer.offset") for key in state) == len(plus)
    fresh = binarize_(small_unet(seed=99), cfg)
    fresh.load_state_dict(state)
    assert all(layer.act_quantizer._initialized for _, layer in quant_layers(fresh))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t).sample, expected, rtol=0, atol=0)
    # 32 bits: LSQ+ is the identity, as LSQ is.
    off = binarize_(small_unet(), cfg.replace(**{"activation.bits": 32}))
    body = [layer.act_quantizer for n, layer in quant_layers(off) if n not in first_last]
    assert all(isinstance(q, LSQPlusQuantizer) and q(x) is x for q in body)


def test_binarized_weights_are_two_valued_per_channel():
    cfg = BinaryDMConfig.v1(**{"weight.bases": 1})
    model = binarize_(small_unet(), cfg)
    layer = dict(quant_layers(model))["mid_block.resnets.0.conv1"]
    w = layer.quantized_weight()
    for channel in w:
        assert len(torch.unique(channel)) == 2


def test_refuses_double_binarize():
    model = binarize_(small_unet())
    with pytest.raises(ValueError, match="already binarized"):
        binarize_(model)


def test_progressive_stage_order():
    model = binarize_(small_unet(), BinaryDMConfig().replace(**{"progressive.stage_steps": 5}))
    layers = dict(quant_layers(model))
    assert layers["mid_block.resnets.0.conv1"].stage == 1
    assert layers["down_blocks.2.resnets.0.conv1"].stage == 2  # innermost level
    assert layers["up_blocks.0.resnets.0.conv1"].stage == 2
    assert layers["down_blocks.1.resnets.0.conv1"].stage == 3
    assert layers["down_blocks.0.resnets.0.conv1"].stage == 4  # outermost level last
    assert layers["up_blocks.2.resnets.0.conv1"].stage == 4
    # Stage i from step (i - 1) * 5: the mid block from step 0 (the official code's order).
    expected = {0: 1, 4: 1, 5: 2, 10: 3, 15: 4, 20: 5, 25: 5, 1000: 5}
    assert {s: active_stage(s, 5, 3) for s in expected} == expected
    apply_schedule(model, 7, 100)
    on = {n for n, layer in layers.items() if layer.active}
    assert "mid_block.resnets.0.conv1" in on and "up_blocks.0.resnets.0.conv1" in on
    assert "down_blocks.1.resnets.0.conv1" not in on
    # Four-level UNet with stage_steps=1: fully binarized at step 4 (stage 5 = the
    # outermost level), attention matmuls (stage 6) at step 5: the official 5-step warm-up.
    assert active_stage(4, 1, 4) == 5 and active_stage(3, 1, 4) == 4
    assert active_stage(5, 1, 4) == 6


def test_inactive_layers_compute_full_precision():
    fp = small_unet()
    x, t = _inputs()
    reference = fp(x, t).sample
    model = binarize_(small_unet(), BinaryDMConfig().replace(**{"progressive.stage_steps": 3}))
    apply_schedule(model, 0, 100)  # stage 1: the mid block only
    active = {name for name, layer in quant_layers(model) if layer.active}
    assert active and all(name.startswith("mid_block.") for name in active)
    for _, layer in quant_layers(model):
        layer.active = False  # with the mid block off too, the model is the FP one exactly
    torch.testing.assert_close(model(x, t).sample, reference, rtol=1e-5, atol=1e-5)
    apply_schedule(model, 99, 100)
    assert (model(x, t).sample - reference).abs().max() > 1e-3


def test_attention_matmul_quantizers_switch_on_last():
    cfg = BinaryDMConfig().replace(
        **{"activation.attention_matmul": True, "progressive.stage_steps": 1}
    )
    model = binarize_(small_unet(), cfg)
    procs = [m for m in model.modules() if isinstance(m, QuantAttnProcessor)]
    assert len(procs) == 4 and {p.stage for p in procs} == {5}
    apply_schedule(model, 3, 100)  # stage 4, the outermost level
    assert not any(p.active for p in procs)
    apply_schedule(model, 4, 100)
    x, t = _inputs()
    model(x, t)
    assert all(p.active and bool(p.probs_quantizer.initialized) for p in procs)
    assert any("processor.probs_quantizer.step" in k for k in model.state_dict())


def test_ebb_switch_through_schedule():
    cfg = BinaryDMConfig().replace(**{"ebb.enabled": True, "ebb.switch_at": 0.5})
    model = binarize_(small_unet(), cfg)
    two = [m for m in model.modules() if isinstance(m, MultiBasisBinarizer) and m.bases == 2]
    apply_schedule(model, 9, 20)
    assert {m.num_active for m in two} == {2}
    apply_schedule(model, 10, 20)
    assert {m.num_active for m in two} == {1}


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"weight.bases": 3, "activation.attention_matmul": True},
        {"ebb.enabled": True, "ebb.switch_at": 0.1},
        {"weight.kind": "lsq", "weight.bits": 2, "first_last": "int8"},
        {"activation.bits": 32},
    ],
)
def test_state_dict_round_trip_gives_identical_outputs(overrides):
    # Every layer quantized from step 0 (v1's progressive init would leave most FP at step 1).
    cfg = BinaryDMConfig.v1(**{"progressive.stage_steps": 0, **overrides})
    model = binarize_(small_unet(seed=0), cfg)
    apply_schedule(model, 1, 2)  # EBB (switch at step 1 of 2): one basis
    x, t = _inputs()
    model(x, t)  # initialise scales and steps
    with torch.no_grad():  # move the learned state away from its init values
        for name, p in model.named_parameters():
            if name.endswith(("scales", "step")):
                p.mul_(1.1)
    expected = model(x, t).sample
    state = model.state_dict()
    fresh = binarize_(small_unet(seed=99), cfg)
    apply_schedule(fresh, 1, 2)
    fresh.load_state_dict(state)
    quantizers = [m for m in fresh.modules() if getattr(m, "enabled", True)]
    assert all(bool(m.initialized) for m in quantizers if hasattr(m, "initialized"))
    torch.testing.assert_close(fresh(x, t).sample, expected, rtol=0, atol=0)


def test_frozen_weights_give_same_output():
    model = binarize_(small_unet())
    x, t = _inputs()
    expected = model(x, t).sample
    for _, layer in quant_layers(model):
        layer.freeze_weights()
    assert all(layer.frozen for _, layer in quant_layers(model))
    torch.testing.assert_close(model(x, t).sample, expected, rtol=0, atol=0)
    # The cache in channels-last (a compiled NHWC sampling step's layout): same values.
    convs = [layer for _, layer in quant_layers(model) if layer.weight.dim() == 4]
    for layer in convs:
        layer.freeze_weights(memory_format=torch.channels_last)
    assert all(
        layer.quantized_weight().is_contiguous(memory_format=torch.channels_last) for layer in convs
    )
    torch.testing.assert_close(model(x, t).sample, expected)
    convs[0].unfreeze_weights()
    assert not convs[0].frozen


def test_config_json_round_trip_and_errors():
    cfg = BinaryDMConfig.v1(**{"lrm.axis": "width", "weight.bases": 3})
    assert BinaryDMConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError, match=r"weight.bases=4 is invalid"):
        cfg.replace(**{"weight.bases": 4})
    with pytest.raises(ConfigError, match=r"activation.bits=5"):
        BinaryDMConfig.from_dict({"activation": {"bits": 5}})
    with pytest.raises(ConfigError, match=r"lrm.weight='x'"):
        BinaryDMConfig.from_dict({"lrm": {"weight": "x"}})
    with pytest.raises(ConfigError, match=r"ebb.enabled"):
        cfg.replace(**{"ebb.enabled": True})  # EBB needs exactly 2 bases
    with pytest.raises(ConfigError, match="unknown key"):
        cfg.replace(**{"lrm.rank": 2})


def test_method_imports_without_platform_dependencies():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('ray', 'mlflow', 'optuna'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import binarydm, binarydm.quant, binarydm.schedule, binarydm.distill\n"
        "import binarydm.metrics.efficiency, binarydm.export\n"
        "from binarydm.train import settings\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_quant_layers_are_quantmixins():
    model = binarize_(small_unet())
    assert all(isinstance(layer, QuantMixin) for _, layer in quant_layers(model))
