"""Checkpoint integrity and fallback, deterministic data order, LR schedule, EMA."""

from __future__ import annotations

import pytest
import torch

from binarydm.train._batches import batch_indices
from binarydm.train._checkpoint import (
    CorruptCheckpointError,
    link_state,
    load_latest_valid,
    load_state,
    save_state,
)
from binarydm.train._ema import ModelEMA
from binarydm.train._loop import lr_lambda, to_unit_range


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path):
    for step in (10, 20):
        save_state(
            tmp_path / f"checkpoint_{step:08d}",
            {"step": step, "w": torch.ones(3) * step},
            step=step,
        )
    newest = tmp_path / "checkpoint_00000020"
    data = bytearray((newest / "state.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (newest / "state.pt").write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="sha256 mismatch"):
        load_state(newest)
    state, notes = load_latest_valid(newest)
    assert state["step"] == 10 and torch.equal(state["w"], torch.full((3,), 10.0))
    assert any("sha256 mismatch" in n for n in notes)
    assert any("resumed from checkpoint_00000010" in n for n in notes)


def test_valid_checkpoint_loads_without_notes(tmp_path):
    save_state(tmp_path / "c", {"step": 5}, step=5)
    state, notes = load_latest_valid(tmp_path / "c")
    assert state == {"step": 5} and notes == []


def test_linked_state_verifies_and_outlives_its_source(tmp_path):
    save_state(tmp_path / "step", {"step": 12, "w": torch.arange(4.0)}, step=12)
    assert link_state(tmp_path / "step", tmp_path / "final")
    # The same file, not a copy; its manifest still verifies.
    assert (tmp_path / "final/state.pt").stat().st_ino == (tmp_path / "step/state.pt").stat().st_ino
    for p in (tmp_path / "step").iterdir():  # the step checkpoint evicted
        p.unlink()
    (tmp_path / "step").rmdir()
    state = load_state(tmp_path / "final")
    assert state["step"] == 12 and torch.equal(state["w"], torch.arange(4.0))


def test_link_state_reports_a_file_system_that_cannot_link(tmp_path, monkeypatch):
    save_state(tmp_path / "step", {"step": 3}, step=3)

    def cross_device(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr("binarydm.train._checkpoint.os.link", cross_device)
    assert not link_state(tmp_path / "step", tmp_path / "final")
    assert list((tmp_path / "final").iterdir()) == []  # nothing half-written to load


def test_training_images_are_scaled_to_the_model_range_per_batch():
    batch = torch.tensor([0, 1, 127, 128, 254, 255], dtype=torch.uint8)
    expected = batch.double() / 127.5 - 1.0
    scaled = to_unit_range(batch)
    assert scaled.dtype == torch.float32
    assert scaled[0] == -1.0 and scaled[-1] == 1.0
    assert torch.allclose(scaled.double(), expected, atol=1e-7)


def test_batches_are_disjoint_across_ranks_and_cover_an_epoch():
    n, batch, world = 40, 5, 2
    seen = []
    for step in range(4):  # 4 steps x 2 ranks x 5 = one epoch of 40
        ranks = [
            batch_indices(step, rank=r, world_size=world, batch_size=batch, num_items=n, seed=3)
            for r in range(world)
        ]
        assert not set(ranks[0].tolist()) & set(ranks[1].tolist())
        seen += [i for r in ranks for i in r.tolist()]
    assert sorted(seen) == list(range(n))
    # Pure function of the step: a resumed run sees the same batch.
    a = batch_indices(7, rank=1, world_size=2, batch_size=5, num_items=n, seed=3)
    b = batch_indices(7, rank=1, world_size=2, batch_size=5, num_items=n, seed=3)
    assert torch.equal(a, b)
    other_seed = batch_indices(7, rank=1, world_size=2, batch_size=5, num_items=n, seed=4)
    assert not torch.equal(a, other_seed)


def test_lr_schedule_warmup_then_cosine():
    assert lr_lambda(0, warmup=10, total=110, schedule="cosine") == pytest.approx(0.1)
    assert lr_lambda(10, warmup=10, total=110, schedule="cosine") == pytest.approx(1.0)
    assert lr_lambda(60, warmup=10, total=110, schedule="cosine") == pytest.approx(0.5)
    assert lr_lambda(110, warmup=10, total=110, schedule="cosine") == pytest.approx(0.0)
    assert lr_lambda(50, warmup=0, total=100, schedule="constant") == 1.0


def test_ema_copies_freshly_initialised_quantizer_state():
    from bdm_support import small_unet

    from binarydm import binarize_
    from binarydm.quant import MultiBasisBinarizer

    model = binarize_(small_unet())
    ema = ModelEMA(model, decay=0.99)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    model(x, t)  # initialises scales from weights
    ema.update(model)
    for (name, m), e in zip(model.named_modules(), ema.module.modules(), strict=True):
        if isinstance(m, MultiBasisBinarizer):
            # Copied, not averaged with the placeholder 1.0.
            torch.testing.assert_close(e.scales, m.scales.detach(), msg=name)
            assert bool(e.initialized)
    with torch.no_grad():
        model.conv_in.weight.add_(1.0)
    before = ema.module.conv_in.weight.clone()
    ema.update(model)
    expected = before + 0.01 * (model.conv_in.weight - before)
    torch.testing.assert_close(ema.module.conv_in.weight, expected)


def test_ema_follows_quantizers_switched_on_after_it_was_created():
    """Progressive init switches layers on after the EMA exists: the EMA must hold their
    initialised state (flags, scales, EBB basis count) and evaluate without re-initialising."""
    from bdm_support import small_unet

    from binarydm import BinaryDMConfig, binarize_
    from binarydm.quant import LSQQuantizer, MultiBasisBinarizer
    from binarydm.schedule import apply_schedule

    config = BinaryDMConfig().replace(
        **{"progressive.stage_steps": 1, "ebb.enabled": True, "ebb.switch_at": 0.45}
    )
    assert config.ebb.switch_step(20) == 9
    model = binarize_(small_unet(), config)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    apply_schedule(model, 0, 20, config)  # only the mid block is quantized
    model(x, t)
    ema = ModelEMA(model, decay=0.9)
    late = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, LSQQuantizer | MultiBasisBinarizer) and not m._initialized
    ]
    assert late, "the schedule should leave some quantizers uninitialised at step 0"
    apply_schedule(model, 10, 20, config)  # every stage on, EBB switched to one basis
    model(x, t)
    ema.update(model)
    ema_modules = dict(ema.module.named_modules())
    for name, m in late:
        e = ema_modules[name]
        assert e._initialized and bool(e.initialized), name
        if isinstance(m, MultiBasisBinarizer):
            assert e.num_active == m.num_active == (1 if m.bases == 2 else m.bases), name
    apply_schedule(ema.module, 10, 20, config)
    state = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        ema.module(x, t)
    for key, value in ema.module.state_dict().items():
        torch.testing.assert_close(value, state[key], msg=f"evaluation changed {key}")


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"progressive.stage_steps": 0},
        {"weight.bases": 1, "ebb.enabled": False, "progressive.stage_steps": 0},
        {"first_last": "int8", "weight.kind": "lsq", "weight.bits": 2, "ebb.enabled": False},
        {"activation.attention_matmul": True, "progressive.stage_steps": 0},
        {"progressive.stage_steps": 5},
        {"activation.bits": 32, "progressive.stage_steps": 0},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default",
)
def test_ddp_unused_parameter_search_only_where_some_get_no_gradient(overrides):
    """DDP without find_unused_parameters fails on a parameter without gradient, and with
    it pays a graph walk each step: the rule must say True exactly when one can occur."""
    from bdm_support import small_unet

    from binarydm import BinaryDMConfig, binarize_
    from binarydm.schedule import apply_schedule
    from binarydm.train._modes import may_leave_unused

    config = BinaryDMConfig().replace(**overrides)
    model = binarize_(small_unet(), config)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    apply_schedule(model, 0, 100, config)
    model(x, t).sample.square().mean().backward()
    without_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert may_leave_unused(model, config) == bool(without_grad), without_grad[:3]
    assert may_leave_unused(small_unet(), None) is False
