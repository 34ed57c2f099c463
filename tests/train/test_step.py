"""The public step functions (``binarydm.train.step``): what one QAT / teacher step
trains, the loss it returns, and that a benchmark-style caller trains as the loop does."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from bdm_support import fit_tiny, small_unet, tiny_settings

from binarydm import BinaryDMConfig, binarize_
from binarydm.distill import LowRankMimicking
from binarydm.quant import MultiBasisBinarizer, QuantMixin
from binarydm.schedule import apply_schedule
from binarydm.train._runner import final_metrics
from binarydm.train.step import NonFiniteLossError, StepParts, qat_step, teacher_step

TAU = 0.5


def _batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x_t = torch.randn(4, 3, 16, 16, generator=generator)
    noise = torch.randn(4, 3, 16, 16, generator=generator)
    return x_t, torch.tensor([1, 50, 300, 900]), noise


def _student(lrm: bool):
    config = BinaryDMConfig().replace(**{"lrm.enabled": lrm, "ebb.tau": TAU})
    teacher = small_unet().eval().requires_grad_(False)
    student = binarize_(copy.deepcopy(teacher), config)
    # Late in the two-basis stage: every layer quantised, both bases on (EBB penalised).
    apply_schedule(student, 10, 100, config)
    return student, teacher, config


def _hand_ebb_penalty(model) -> torch.Tensor:
    """tau * mean over the two-basis layers of mean(s_2), read off the binarizers."""
    second = [
        layer.weight_quantizer.scales[1].mean()
        for layer in model.modules()
        if isinstance(layer, QuantMixin)
        and layer.active
        and isinstance(layer.weight_quantizer, MultiBasisBinarizer)
        and layer.weight_quantizer.num_active >= 2
    ]
    assert second, "no two-basis layer: the test would not cover the penalty"
    return TAU * torch.stack(second).mean()


@pytest.mark.parametrize("lrm", [False, True], ids=["no-lrm", "lrm"])
def test_qat_step_loss_is_the_sum_of_its_components_with_the_ebb_penalty(lrm):
    student, teacher, config = _student(lrm)
    x_t, t, noise = _batch()
    with torch.no_grad():
        student(x_t, t)  # initialise the quantizers, as the loop's first forward does
    reference = copy.deepcopy(student)
    with torch.no_grad():
        expected_noise = F.mse_loss(reference(x_t, t).sample, noise).item()
    expected_ebb = _hand_ebb_penalty(reference).item()
    lrm_module = LowRankMimicking(student, teacher, config.lrm) if lrm else None
    parts = StepParts(
        student, torch.optim.AdamW(student.parameters(), lr=1e-3), lrm=lrm_module, tau=TAU
    )
    before = {k: v.clone() for k, v in student.state_dict().items()}
    losses = qat_step(parts, x_t, t, noise, step=10)
    assert losses.loss_noise == pytest.approx(expected_noise, rel=1e-5)
    assert losses.loss_ebb == pytest.approx(expected_ebb, rel=1e-5) and losses.loss_ebb > 0
    weight = config.lrm.weight if lrm else 0.0
    assert (losses.loss_lrm > 0) == lrm
    hand = expected_noise + weight * losses.loss_lrm + expected_ebb
    assert losses.loss == pytest.approx(hand, rel=1e-5)
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.endswith("weight") for k in changed)  # the latent weights moved
    assert any(k.endswith("scales") for k in changed)  # so did the binarizer scales


def test_qat_step_without_ebb_adds_no_penalty():
    student, _, _ = _student(lrm=False)
    x_t, t, noise = _batch()
    parts = StepParts(student, torch.optim.AdamW(student.parameters()), tau=0.0)
    losses = qat_step(parts, x_t, t, noise, step=0)
    assert losses.loss_ebb == 0.0 and losses.loss == losses.loss_noise


def test_teacher_step_trains_the_noise_mse_and_its_ema():
    model = small_unet()
    x_t, t, noise = _batch()
    with torch.no_grad():
        expected = F.mse_loss(model(x_t, t).sample, noise).item()
    parts = StepParts(model, torch.optim.AdamW(model.parameters()), ema_decay=0.9, grad_clip=1.0)
    losses = teacher_step(parts, x_t, t, noise, step=0)
    assert losses.values() == (pytest.approx(expected, rel=1e-5),) * 2 + (0.0, 0.0)
    assert parts.ema is not None  # made after the first step
    teacher_step(parts, x_t, t, noise, step=1)
    assert not torch.equal(parts.ema.module.conv_in.weight, model.conv_in.weight)


def test_non_finite_loss_raises_before_the_weights_move():
    student, _, _ = _student(lrm=False)
    x_t, t, noise = _batch()
    parts = StepParts(student, torch.optim.AdamW(student.parameters()), tau=TAU)
    with torch.no_grad():
        student(x_t, t)
    before = copy.deepcopy(student.state_dict())
    with pytest.raises(NonFiniteLossError, match="non-finite loss \\(nan\\) at step 3") as info:
        qat_step(parts, x_t, t, noise * float("nan"), step=3)
    assert info.value.step == 3
    assert info.value.reason.startswith("NonFiniteLossError: non-finite loss")
    for key, value in student.state_dict().items():
        assert torch.equal(value, before[key]), key


class _Recorder:
    """A Ray Train user callback that keeps the metrics it saw."""

    def __init__(self) -> None:
        self.reports: list[dict] = []

    def after_report(self, run_context, metrics, checkpoint) -> None:
        self.reports.append(metrics[0])


def test_benchmark_style_caller_gets_the_loss_of_the_loop(tiny_teacher, workspace):
    """Built by hand as a benchmark does, the first step's loss is the loop's (EBB on)."""
    from binarydm.models import load_unet
    from binarydm.train._batches import batch_indices
    from binarydm.train._diffusion import noise_scheduler, noisy_batch
    from binarydm.train._loop import load_training_images, to_unit_range

    settings = tiny_settings(
        **{
            "training.steps": 10,
            "training.log_every": 1,
            "training.checkpoint_every": 10,
            "workers.inline": True,
        }
    )
    method, train = settings.method, settings.training
    assert method.ebb.enabled and method.ebb.tau > 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the inline loop's intra-op threads (float sums)
    try:
        recorder = _Recorder()
        result = fit_tiny(settings, "step-eq", workspace, tiny_teacher, [recorder], False)
        assert final_metrics(result)["step"] == 10
        loop_loss = recorder.reports[0]["loss"]  # the first report: step 1 alone
        assert recorder.reports[0]["step"] == 1
        student = load_unet(tiny_teacher)
        teacher = copy.deepcopy(student).eval().requires_grad_(False)
        binarize_(student, method)
        lrm = LowRankMimicking(student, teacher, method.lrm) if method.lrm.enabled else None
        images = load_training_images(settings, workspace["data_root"], workspace["cache_dir"])
        idx = batch_indices(
            0, rank=0, world_size=1, batch_size=train.batch_size, num_items=len(images),
            seed=settings.seed,
        )  # fmt: skip
        generator = torch.Generator().manual_seed((settings.seed * 7919 + 0) * 131 + 0)
        x_t, t, noise = noisy_batch(
            to_unit_range(images[idx]), noise_scheduler(train.num_train_timesteps), generator
        )
        apply_schedule(student, 0, train.steps, method)
        parts = StepParts(
            student, torch.optim.AdamW(student.parameters()), lrm=lrm, tau=method.ebb.tau
        )
        losses = qat_step(parts, x_t, t, noise, step=0)
    finally:
        torch.set_num_threads(threads)
    assert losses.loss == pytest.approx(loop_loss, rel=1e-6)
