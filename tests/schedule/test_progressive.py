"""The progressive stages and the EBB switch as functions of the step: stage starts, the
anneal gain, the fold, the validation that keeps stages and switch inside the run."""

from __future__ import annotations

import pytest
import torch
from bdm_support import small_unet

from binarydm import BinaryDMConfig, binarize_
from binarydm._typed import ConfigError
from binarydm.quant import MultiBasisBinarizer, quant_layers
from binarydm.schedule import (
    active_stage,
    apply_schedule,
    check_schedule,
    ebb_bases,
    ebb_gain,
    last_stage,
    stage_start,
)
from binarydm.train.settings import TrialSettings


def _inputs(batch: int = 2, size: int = 16):
    torch.manual_seed(1)
    return torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))


def _two_basis(model):
    return [m for m in model.modules() if isinstance(m, MultiBasisBinarizer) and m.bases == 2]


def test_stage_i_switches_on_at_i_minus_one_times_stage_steps():
    # The mid block (stage 1) from step 0, as in the official code; 3 levels: 5 stages.
    expected = {0: 1, 4: 1, 5: 2, 9: 2, 10: 3, 15: 4, 20: 5, 1000: 5}
    assert {s: active_stage(s, 5, 3) for s in expected} == expected
    assert [stage_start(i, 5) for i in (1, 2, 3, 4, 5)] == [0, 5, 10, 15, 20]
    assert active_stage(0, 0, 3) == 5  # stage_steps 0: everything from step 0
    # A four-level UNet at stage_steps 1 (the official warm-up): fully binarized at step 4
    # without attention-matmul quantizers (stage 5), at step 5 with them (stage 6).
    config = BinaryDMConfig()
    assert last_stage(4, config) == 5 and stage_start(5, 1) == 4
    attention = config.replace(**{"activation.attention_matmul": True})
    assert last_stage(4, attention) == 6 and stage_start(6, 1) == 5


def test_mid_block_is_quantized_at_step_zero():
    model = binarize_(small_unet(), BinaryDMConfig.v1(**{"progressive.stage_steps": 5}))
    layers = dict(quant_layers(model))
    apply_schedule(model, 0, 100)
    on = {name for name, layer in layers.items() if layer.active}
    assert "mid_block.resnets.0.conv1" in on
    assert not any(name.startswith(("down_blocks", "up_blocks")) for name in on)
    apply_schedule(model, 5, 100)  # stage 2: the innermost level (down 2, up 0)
    on = {name for name, layer in layers.items() if layer.active}
    assert "down_blocks.2.resnets.0.conv1" in on and "up_blocks.0.resnets.0.conv1" in on
    assert "down_blocks.1.resnets.0.conv1" not in on


def test_ebb_switch_step_is_a_fraction_of_the_run():
    config = BinaryDMConfig.v5(**{"ebb.switch_at": 0.5, "ebb.transition": "drop"})
    assert config.ebb.switch_step(150) == 75 and config.ebb.switch_step(1) == 1
    assert [ebb_bases(s, config, 150) for s in (0, 74, 75, 149)] == [2, 2, 1, 1]
    assert ebb_bases(0, BinaryDMConfig.v1(), 150) is None
    model = binarize_(small_unet(), config)
    apply_schedule(model, 74, 150)
    assert {m.num_active for m in _two_basis(model)} == {2}
    apply_schedule(model, 75, 150)
    assert {m.num_active for m in _two_basis(model)} == {1}


def test_anneal_gain_falls_linearly_to_zero_at_the_switch():
    config = BinaryDMConfig.v5(**{"ebb.switch_at": 0.5, "ebb.anneal_fraction": 0.5})
    # 200 steps: switch at 100, anneal over the 50 steps before it.
    assert config.ebb.anneal_start(200) == 50
    gains = {s: ebb_gain(s, config, 200) for s in (0, 49, 50, 75, 99, 100, 199)}
    assert gains == {0: 1.0, 49: 1.0, 50: 1.0, 75: 0.5, 99: 0.02, 100: 0.0, 199: 0.0}
    assert ebb_gain(75, config.replace(**{"ebb.transition": "drop"}), 200) == 1.0


def _output_jump(transition: str) -> tuple[float, float]:
    """Max output change across the switch and the output change an abrupt drop causes."""
    # A32: with 4-bit activations a small weight change flips roundings and hides the trend.
    config = BinaryDMConfig.v5(
        **{
            "ebb.transition": transition,
            "lrm.enabled": False,
            "ebb.anneal_fraction": 0.5,
            "activation.bits": 32,
        }
    )
    model = binarize_(small_unet(), config).eval()
    x, t = _inputs()
    apply_schedule(model, 0, 200)
    with torch.no_grad():
        model(x, t)  # initialise scales and steps
        before_anneal = model(x, t).sample
        apply_schedule(model, 99, 200)  # the last two-basis step
        before = model(x, t).sample
        apply_schedule(model, 100, 200)
        after = model(x, t).sample
    return (after - before).abs().max().item(), (after - before_anneal).abs().max().item()


def test_anneal_makes_the_switch_continuous():
    jump, total = _output_jump("anneal")
    drop_jump, _ = _output_jump("drop")
    # The last two-basis step keeps 1/50 of the second basis: the switch removes only that.
    assert drop_jump > 0.05
    assert jump < drop_jump / 10
    assert total > jump  # the anneal itself did change the model, gradually


def test_fold_moves_the_least_squares_share_into_the_first_scale():
    config = BinaryDMConfig.v5(**{"ebb.transition": "fold", "lrm.enabled": False})
    model = binarize_(small_unet(), config)
    x, t = _inputs()
    apply_schedule(model, 0, 100)
    with torch.no_grad():
        model(x, t)
    name, layer = next((n, m) for n, m in quant_layers(model) if m.weight_quantizer.bases == 2)
    binarizer = layer.weight_quantizer
    with torch.no_grad():
        two_basis = binarizer(layer.weight).clone()
        b1, b2 = binarizer.signs(layer.weight)
        s1, s2 = binarizer.scales[0].clone(), binarizer.scales[1].clone()
    apply_schedule(model, 50, 100)  # the switch
    assert binarizer.num_active == 1
    dims = tuple(range(1, b1.dim()))
    expected = s1 + s2 * (b1 * b2).mean(dim=dims, keepdim=True)
    torch.testing.assert_close(binarizer.scales[0].detach(), expected, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        folded = binarizer(layer.weight)
        dropped = s1 * b1
    # Per output channel the folded scale is the least-squares fit of the 2-basis weight.
    folded_error = (folded - two_basis).pow(2).sum()
    assert folded_error < (dropped - two_basis).pow(2).sum(), name
    for scale in (0.99, 1.01):
        alternative = (binarizer.scales[0].detach() * scale) * b1
        assert folded_error <= (alternative - two_basis).pow(2).sum()


def test_resume_after_the_fold_does_not_fold_twice():
    config = BinaryDMConfig.v5(**{"ebb.transition": "fold", "lrm.enabled": False})
    model = binarize_(small_unet(), config)
    x, t = _inputs()
    apply_schedule(model, 0, 100)
    with torch.no_grad():
        model(x, t)
    apply_schedule(model, 50, 100)
    scales = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("scales")}
    apply_schedule(model, 51, 100)  # already one basis: nothing folds again
    for n, p in model.named_parameters():
        if n.endswith("scales"):
            torch.testing.assert_close(p.detach(), scales[n], rtol=0, atol=0)


def test_check_schedule_names_the_key_and_the_limit():
    config = BinaryDMConfig.v1(**{"progressive.stage_steps": 60})
    check_schedule(3, config, 181)  # stage 4 begins at step 180, the last step
    with pytest.raises(ConfigError, match=r"progressive.stage_steps=60 .* at most 59 .*step 180"):
        check_schedule(3, config, 180)
    ebb = BinaryDMConfig.v5(**{"progressive.stage_steps": 20, "ebb.switch_at": 0.3})
    with pytest.raises(ConfigError, match=r"ebb.switch_at=0.3 .*last progressive stage begins "):
        check_schedule(3, ebb, 200)  # stage 4 at step 60, the switch at 60
    check_schedule(3, ebb.replace(**{"ebb.switch_at": 0.31}), 200)


def test_trial_settings_reject_stages_and_switches_past_the_run():
    settings = TrialSettings()  # the tiny preset: 3 levels, 2000 steps
    with pytest.raises(ConfigError, match=r"method.progressive.stage_steps=700 .*at most 666"):
        settings.replace(**{"method.progressive.stage_steps": 700})
    with pytest.raises(ConfigError, match=r"method.ebb.switch_at=0.95 .*\(0, 0.9\]"):
        settings.replace(**{"method.ebb.switch_at": 0.95})
    with pytest.raises(ConfigError, match=r"method.ebb.switch_at=0.001 .*step 2 of 2000"):
        settings.replace(**{"method.ebb.switch_at": 0.001, "method.progressive.stage_steps": 10})
    settings.replace(**{"method.ebb.switch_at": 0.9, "method.progressive.stage_steps": 599})


def test_ebb_penalty_covers_only_layers_the_schedule_switched_on():
    from binarydm.quant import ebb_penalty

    config = BinaryDMConfig.v5(**{"progressive.stage_steps": 5})
    model = binarize_(small_unet(), config)
    x, t = _inputs()
    apply_schedule(model, 40, 100)  # every stage on, before the switch: initialise them all
    with torch.no_grad():
        model(x, t)
    two = [
        layer
        for _, layer in quant_layers(model)
        if layer.weight_quantizer.bases == 2 and layer.weight_quantizer.num_active == 2
    ]
    apply_schedule(model, 0, 100)  # only the mid block: no 2-basis layer is on
    assert float(ebb_penalty(model)) == 0.0
    assert two and not ebb_penalty(model).requires_grad  # no graph to any scale
    apply_schedule(model, 15, 100)  # stage 4 = the outermost level (down 0, up 2) is on
    expected = torch.stack([layer.weight_quantizer.scales[1].mean() for layer in two]).mean()
    torch.testing.assert_close(ebb_penalty(model), expected)
