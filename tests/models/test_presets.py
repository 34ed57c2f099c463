"""UNet presets (exact sizes, structure, forward), pretrained loading and teacher cache keys."""

from __future__ import annotations

import re

import pytest
import torch
from diffusers import UNet2DModel

from binarydm.models import (
    PRESETS,
    ModelLoadError,
    build_unet,
    count_parameters,
    load_unet,
    preset_config,
    teacher_cache_key,
    teacher_dir,
)

EXACT_PARAMETERS = {
    "tiny": 280_177,
    "small": 2_245_763,
    "ddpm-cifar10": 35_746_307,
    "ldm4-bedroom": 274_056_163,
}


@pytest.mark.parametrize("preset", sorted(EXACT_PARAMETERS))
def test_parameter_counts_are_exact(preset):
    assert count_parameters(build_unet(preset)) == EXACT_PARAMETERS[preset]


def test_sizes_match_their_targets():
    assert EXACT_PARAMETERS["tiny"] < 1_000_000
    assert 1_000_000 <= EXACT_PARAMETERS["small"] <= 4_000_000
    assert 35_600_000 <= EXACT_PARAMETERS["ddpm-cifar10"] <= 35_800_000
    # The paper's FP LDM-4 size: 1045.4 "MB" (MiB) of FP32 weights.
    assert round(EXACT_PARAMETERS["ldm4-bedroom"] * 4 / 2**20, 1) == 1045.4
    assert set(PRESETS) == set(EXACT_PARAMETERS)


def test_ddpm_cifar10_matches_the_google_checkpoint_config():
    config = PRESETS["ddpm-cifar10"]
    assert config["block_out_channels"] == (128, 256, 256, 256)
    assert config["down_block_types"] == (
        "DownBlock2D",
        "AttnDownBlock2D",
        "DownBlock2D",
        "DownBlock2D",
    )
    assert config["up_block_types"] == ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    assert (config["layers_per_block"], config["sample_size"]) == (2, 32)
    assert (config["downsample_padding"], config["freq_shift"]) == (0, 1)
    assert config["flip_sin_to_cos"] is False


def test_tiny_exercises_levels_and_attention_and_runs_forward():
    torch.manual_seed(0)
    model = build_unet("tiny")
    assert len(model.down_blocks) == 3
    attention = [name for name, _ in model.named_modules() if name.endswith(".to_q")]
    assert any(name.startswith("down_blocks.1.") for name in attention)
    assert any(name.startswith("mid_block.") for name in attention)
    sample = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        out = model(sample, torch.tensor([10, 900])).sample
    assert out.shape == sample.shape
    assert torch.isfinite(out).all() and out.std() > 0


def test_overrides_resize_and_recolour_the_model():
    model = build_unet("tiny", in_channels=3, sample_size=16, layers_per_block=2)
    assert (model.config.in_channels, model.config.out_channels) == (3, 3)
    assert model.config.sample_size == 16 and model.config.layers_per_block == 2
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 16, 16), 5).sample.shape == (1, 3, 16, 16)
    assert preset_config("small", in_channels=1, out_channels=2)["out_channels"] == 2


def test_invalid_presets_and_overrides_are_named():
    with pytest.raises(ValueError, match="'huge'.*allowed"):
        build_unet("huge")
    with pytest.raises(ValueError, match="layers_per_blok"):
        build_unet("tiny", layers_per_blok=2)
    with pytest.raises(ValueError, match="multiple of 8"):
        build_unet("ddpm-cifar10", sample_size=28)
    with pytest.raises(TypeError):
        PRESETS["tiny"]["sample_size"] = 64


def test_save_and_load_round_trip_including_pipeline_layout(tmp_path):
    torch.manual_seed(1)
    model = build_unet("tiny")
    model.save_pretrained(tmp_path / "model")
    model.save_pretrained(tmp_path / "pipeline" / "unet")
    for location in (tmp_path / "model", tmp_path / "pipeline"):
        loaded = load_unet(location)
        assert isinstance(loaded, UNet2DModel)
        assert list(loaded.config.block_out_channels) == [16, 32, 32]
        for key, value in model.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)


def test_offline_missing_hub_model_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    hub_id = "binarydm-tests/no-such-unet"
    with pytest.raises(ModelLoadError) as info:
        load_unet(hub_id)
    message = str(info.value)
    assert hub_id in message and "offline" in message
    assert "subfolder 'unet'" in message  # both the model and the pipeline layout were tried
    with pytest.raises(ModelLoadError, match="is a file"):
        load_unet(__file__)


def test_teacher_cache_key_is_stable_and_sensitive(tmp_path, monkeypatch):
    args = ("tiny", "mnist", "ab" * 32, 32, 2000, 0)
    key = teacher_cache_key(*args)
    assert re.fullmatch(r"[0-9a-f]{16}", key)
    assert teacher_cache_key(*args) == key
    for position, changed in enumerate(("small", "cifar10", "cd" * 32, 16, 1000, 1)):
        varied = list(args)
        varied[position] = changed
        assert teacher_cache_key(*varied) != key
    assert teacher_cache_key(*args, extra={"lr": 1e-3}) != key

    (tmp_path / "teacher").mkdir()
    monkeypatch.chdir(tmp_path)
    relative = teacher_cache_key("teacher", *args[1:])
    assert teacher_cache_key(tmp_path / "teacher", *args[1:]) == relative
    assert teacher_dir(tmp_path / "cache", key) == (tmp_path / "cache" / "teachers" / key)
