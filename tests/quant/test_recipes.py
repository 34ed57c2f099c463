"""Named recipes and the bits they really have: baseline, paper v1/v2 (LMB kept) and paper v5
(EBB: pure 1-bit once switched), counted from ddpm-cifar10; the ablation rows use them."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import pytest
import torch

from binarydm import BinaryDMConfig, binarize_
from binarydm._typed import ConfigError
from binarydm.metrics.efficiency import efficiency_report
from binarydm.models import build_unet
from binarydm.quant import MultiBasisBinarizer, quant_layers
from binarydm.quant.config import RECIPES
from binarydm.schedule import apply_schedule
from binarydm.spec import load_study

ABLATION = Path(__file__).resolve().parents[2] / "search_spaces" / "ablation.yaml"
# ddpm-cifar10: 35,356,672 quantized weights, 13,271,040 of them in the 2 outer levels.
OUTER_SHARE = 13_271_040 / 35_356_672


@functools.cache
def _fp_model():
    return build_unet("ddpm-cifar10")


def _report(config: BinaryDMConfig, *, trained_steps: int | None = None):
    model = binarize_(copy.deepcopy(_fp_model()), config)
    if trained_steps is not None:  # the schedule of the last step of a run
        apply_schedule(model, trained_steps - 1, trained_steps)
    example = (torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long))
    return model, efficiency_report(model, example)


def test_default_is_the_paper_v5_recipe():
    config = BinaryDMConfig()
    assert config == BinaryDMConfig.v5() == RECIPES["v5"]()
    assert config.ebb.enabled and config.lrm.enabled and config.progressive.stage_steps == 1
    assert (config.weight.bases, config.weight.scope_levels) == (2, 2)
    assert config.deployed_bases == 1 and BinaryDMConfig.v1().deployed_bases == 2
    baseline = BinaryDMConfig.baseline()
    assert baseline.weight.bases == 1 and not baseline.ebb.enabled and not baseline.lrm.enabled
    assert baseline.progressive.stage_steps == 0
    assert BinaryDMConfig.v1() == config.replace(**{"ebb.enabled": False})


def test_weight_bits_of_each_recipe_on_ddpm_cifar10():
    _, baseline = _report(BinaryDMConfig.baseline())
    _, lmb = _report(BinaryDMConfig.v1())
    ebb_model, ebb = _report(BinaryDMConfig.v5(), trained_steps=1000)
    _, lsq = _report(BinaryDMConfig.baseline(**{"weight.kind": "lsq", "weight.bits": 2}))
    assert baseline.weight_bits == 1.0
    assert lmb.weight_bits == pytest.approx(1 + OUTER_SHARE, abs=1e-12)  # 1.3753
    assert round(lmb.weight_bits, 3) == 1.375
    assert lsq.weight_bits == 2.0
    # The deployed EBB model: one basis everywhere, the baseline's size and OPs.
    assert ebb.weight_bits == 1.0
    binarizers = [m for m in ebb_model.modules() if isinstance(m, MultiBasisBinarizer)]
    assert {m.num_active for m in binarizers} == {1}
    assert ebb.size_mib == baseline.size_mib and ebb.ops_g == baseline.ops_g
    assert lmb.size_mib == pytest.approx(7.43, abs=0.005) and baseline.size_mib == pytest.approx(
        5.80, abs=0.005
    )
    assert baseline.to_dict()["weight_bits"] == 1.0


def test_untrained_ebb_model_counts_its_second_basis():
    # Before the switch the model has two bases in the outer levels and says so.
    _, before = _report(BinaryDMConfig.v5())
    assert before.weight_bits == pytest.approx(1 + OUTER_SHARE, abs=1e-12)


def test_first_last_int8_weights_count_eight_bits():
    model = binarize_(build_unet("small"), BinaryDMConfig.baseline(**{"first_last": "int8"}))
    example = (torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long))
    report = efficiency_report(model, example)
    layers = dict(quant_layers(model))
    counts = {name: layer.weight.numel() for name, layer in layers.items()}
    eight = counts["conv_in"] + counts["conv_out"]
    total = sum(counts.values())
    assert report.weight_bits == pytest.approx((total - eight + 8 * eight) / total, abs=1e-12)


def test_ebb_needs_two_bases_and_says_how_to_turn_it_off():
    with pytest.raises(ConfigError, match=r"ebb.enabled=True .*bases=1\): set ebb.enabled=false"):
        BinaryDMConfig().replace(**{"weight.bases": 1})
    with pytest.raises(ConfigError, match=r"ebb.enabled=True .*scope_levels >= 1"):
        BinaryDMConfig().replace(**{"weight.scope_levels": 0})


def test_config_json_carries_its_version():
    text = BinaryDMConfig().to_json()
    assert json.loads(text)["config_version"] == BinaryDMConfig.CONFIG_VERSION
    assert BinaryDMConfig.from_json(text) == BinaryDMConfig()
    old = {**json.loads(text), "config_version": 1}
    with pytest.raises(ConfigError, match=r"config_version=1 is invalid"):
        BinaryDMConfig.from_dict(old)
    assert "config_version" not in BinaryDMConfig().flat()  # params: no version key


def test_ablation_rows_are_the_recipes():
    spec = load_study(ABLATION)
    rows = spec.search.space["row"].choices
    assert rows == ("vanilla", "ebb", "binarydm", "lrm", "lmb")
    method = {row: spec.trial_settings({"row": row}, 0).method for row in rows}
    assert method["vanilla"] == BinaryDMConfig.baseline()
    assert method["ebb"] == BinaryDMConfig.v5(**{"lrm.enabled": False})
    assert method["binarydm"] == BinaryDMConfig.v5()
    assert method["lrm"] == BinaryDMConfig.baseline(**{"lrm.enabled": True})
    assert method["lmb"] == BinaryDMConfig.v1()
    gpu = load_study(ABLATION, profile="gpu")
    assert gpu.trial_settings({"row": "binarydm"}, 0).method == BinaryDMConfig.v5()
    assert spec.search.seeds == (0,) and spec.search.trials == 5
    assert gpu.search.seeds == (0, 1)
