"""The EMA's warm-up (DDPM's min(decay, (1+n)/(10+n))), its reset at the EBB switch and
its state round trip."""

from __future__ import annotations

import pytest
import torch
from bdm_support import small_unet

from binarydm import BinaryDMConfig, binarize_
from binarydm.quant import MultiBasisBinarizer
from binarydm.schedule import apply_schedule
from binarydm.train._ema import ModelEMA


def test_warmed_up_decay_follows_ddpm():
    model = torch.nn.Linear(2, 2)
    ema = ModelEMA(model, 0.999, warmup=True)
    decays = []
    for _ in range(2000):
        decays.append(ema.current_decay())
        ema.update(model)
    assert decays[0] == pytest.approx(0.1) and decays[9] == pytest.approx(10 / 19)
    assert decays[1499] == pytest.approx(1500 / 1509) and decays[-1] == pytest.approx(2000 / 2009)
    capped = ModelEMA(model, 0.9, warmup=True)
    for _ in range(80):  # (1 + n) / (10 + n) reaches 0.9 at n = 80
        assert capped.current_decay() < 0.9
        capped.update(model)
    assert capped.current_decay() == 0.9
    assert ModelEMA(model, 0.999).current_decay() == 0.999


def test_warmed_up_ema_forgets_the_start_faster():
    """After 1500 updates a fixed 0.999 keeps 22% of its weight on the start; warmed up,
    the start's weight is the product of the decays, far smaller."""
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    fixed, warm = ModelEMA(model, 0.999), ModelEMA(model, 0.999, warmup=True)
    with torch.no_grad():
        model.weight.fill_(0.0)  # every later weight is 0: the EMA is the start's share
    for _ in range(1500):
        fixed.update(model)
        warm.update(model)
    assert fixed.module.weight.item() == pytest.approx(0.999**1500, rel=1e-4)  # 0.2229
    assert 0.22 < fixed.module.weight.item() < 0.23
    assert warm.module.weight.item() < 1e-3


def test_reset_restarts_from_the_live_model_at_the_ebb_switch():
    config = BinaryDMConfig.v5(**{"lrm.enabled": False})
    model = binarize_(small_unet(), config)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    apply_schedule(model, 0, 20, config)
    model(x, t)
    ema = ModelEMA(model, 0.99, warmup=True)
    for _ in range(5):
        ema.update(model)
    apply_schedule(model, 10, 20, config)  # the switch: one basis
    with torch.no_grad():
        model.conv_in.weight.add_(1.0)
    ema.reset(model)
    assert ema.updates == 0 and ema.current_decay() == pytest.approx(0.1)
    torch.testing.assert_close(ema.module.conv_in.weight, model.conv_in.weight.detach())
    live = [m for m in model.modules() if isinstance(m, MultiBasisBinarizer)]
    copies = [m for m in ema.module.modules() if isinstance(m, MultiBasisBinarizer)]
    assert [m.num_active for m in copies] == [m.num_active for m in live]
    assert {m.num_active for m in copies if m.bases == 2} == {1}
    state = ema.state_dict()
    again = ModelEMA(model, 0.99, warmup=True)
    again.load_state_dict(state)
    assert again.updates == 0
    torch.testing.assert_close(again.module.conv_in.weight, ema.module.conv_in.weight)
