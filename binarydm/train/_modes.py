"""What differs between FP teacher pretraining and BinaryDM QAT, decided once per run.

``training_mode(job)`` returns a ``TeacherMode`` or a ``QATMode``; the loop asks it
for its hyperparameters (a ``Recipe``), its models, its step function, what happens
before each step (the progressive schedule, the EBB switch) and what the final
checkpoint holds, instead of checking for a missing QAT method at every turn.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch

from binarydm.train.job import WorkerJob
from binarydm.train.step import qat_step, teacher_step


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The optimisation hyperparameters of one run (teacher or QAT)."""

    seed: int
    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int
    lr_schedule: str
    ema_decay: float
    ema_warmup: bool
    grad_clip: float
    num_train_timesteps: int
    log_every: int
    checkpoint_every: int
    compile_options: dict[str, Any] | None  # None: eager


class TeacherMode:
    """FP teacher pretraining: DDPM's recipe (constant lr, clip 1, warmed-up EMA)."""

    name = "teacher"
    label = "FP teacher pretraining"
    step = staticmethod(teacher_step)

    def __init__(self, job: WorkerJob) -> None:
        self.job = job
        teacher = job.settings.teacher
        # The teacher's data order and noise follow the teacher's seed, QAT's the trial's.
        self.recipe = Recipe(
            seed=teacher.seed,
            steps=teacher.steps,
            batch_size=teacher.batch_size,
            lr=teacher.lr,
            weight_decay=0.0,
            warmup_steps=0,
            lr_schedule="constant",
            ema_decay=teacher.ema_decay,
            ema_warmup=True,
            grad_clip=1.0,
            num_train_timesteps=1000,
            log_every=100,
            checkpoint_every=max(1, teacher.steps // 4),
            compile_options=None,
        )
        self.tau = 0.0

    def build(self, device: torch.device):
        """The model to train and the frozen teacher (none here), on ``device``."""
        from binarydm.models import build_unet

        settings = self.job.settings
        torch.manual_seed(settings.teacher.seed)
        model = build_unet(
            settings.teacher.preset,
            in_channels=settings.data.channels,
            sample_size=settings.data.resolution,
        )
        return model.to(device), None

    def make_lrm(self, model, teacher, device):
        return None

    def may_leave_unused(self, model: torch.nn.Module) -> bool:
        return False  # every FP parameter gets a gradient every step

    def restore_schedule(self, model: torch.nn.Module, start_step: int) -> None:
        pass

    def before_step(self, parts, step: int) -> None:
        pass

    def write_final(self, parts, folder: Path, metrics: dict[str, Any]) -> None:
        # DDPM's teacher is its EMA (the shared CIFAR-10 teacher is too).
        model = parts.ema.module if parts.ema is not None else parts.model
        model.save_pretrained(folder / "unet")


class QATMode:
    """BinaryDM QAT of the binarised student against the frozen FP teacher."""

    name = "qat"
    label = "BinaryDM QAT"
    step = staticmethod(qat_step)

    def __init__(self, job: WorkerJob) -> None:
        self.job = job
        settings = job.settings
        train, self.method = settings.training, settings.method
        self.recipe = Recipe(
            seed=settings.seed,
            steps=train.steps,
            batch_size=train.batch_size,
            lr=train.lr,
            weight_decay=train.weight_decay,
            warmup_steps=train.warmup_steps,
            lr_schedule=train.lr_schedule,
            ema_decay=train.ema_decay,
            ema_warmup=train.ema_warmup,
            grad_clip=train.grad_clip,
            num_train_timesteps=train.num_train_timesteps,
            log_every=train.log_every,
            checkpoint_every=train.checkpoint_every,
            compile_options=train.compile_options() if train.compile else None,
        )
        ebb = self.method.ebb
        self.tau = ebb.tau if ebb.enabled else 0.0
        self.ebb_switch = ebb.switch_step(train.steps) if ebb.enabled else None

    def build(self, device: torch.device):
        from binarydm.models import load_unet
        from binarydm.quant import binarize_, num_levels
        from binarydm.schedule import check_schedule

        # Moved first, then copied and binarised on the device, not by the host's cores,
        # which the trials of a wave share while they all start (benchmarks/results/
        # gpu_perf.md, session 6: the start-up probe).
        student = load_unet(self.job.teacher_dir).to(device)
        teacher = copy.deepcopy(student).eval().requires_grad_(False)
        binarize_(student, self.method)  # its layers stay on the weights' device
        # The settings checked this for presets and local folders; a hub model's levels
        # are known only now.
        check_schedule(num_levels(student), self.method, self.recipe.steps, prefix="method.")
        return student, teacher

    def make_lrm(self, model, teacher, device):
        if not self.method.lrm.enabled:
            return None
        from binarydm.distill import LowRankMimicking

        return LowRankMimicking(model, teacher, self.method.lrm).to(device)

    def may_leave_unused(self, model: torch.nn.Module) -> bool:
        return may_leave_unused(model, self.method)

    def restore_schedule(self, model: torch.nn.Module, start_step: int) -> None:
        from binarydm.schedule import apply_schedule

        # Quantizer on/off and basis count must match the saved step before loading.
        apply_schedule(model, max(0, start_step - 1), self.recipe.steps, self.method)

    def before_step(self, parts, step: int) -> None:
        from binarydm.schedule import apply_schedule

        apply_schedule(parts.model, step, self.recipe.steps, self.method)
        if step == self.ebb_switch and parts.ema is not None:
            # The deployed model has one basis: its average must not include the
            # two-basis weights of the first stage.
            parts.ema.reset(parts.model)

    def write_final(self, parts, folder: Path, metrics: dict[str, Any]) -> None:
        if not self.job.evaluate:
            return
        from binarydm.train._evaluate import evaluate

        settings = self.job.settings
        use_ema = parts.ema is not None and settings.evaluation.use_ema
        model = parts.ema.module if use_ema else parts.model
        metrics.update(
            evaluate(
                model, settings, folder, data_root=self.job.data_root, cache_dir=self.job.cache_dir
            )
        )


def training_mode(job: WorkerJob) -> TeacherMode | QATMode:
    return TeacherMode(job) if job.mode == "teacher" else QATMode(job)


def may_leave_unused(model: torch.nn.Module, method) -> bool:
    """Whether some parameter can get no gradient in a step, so DDP must look for them.

    Inactive progressive stages and the steps of disabled (32-bit) quantizers get none
    (the basis EBB drops does: all bases' scales are one tensor). Searching costs DDP an
    autograd-graph walk every step, so it is asked for only then: never for FP teacher
    training, not for a plain W1A4 run.
    """
    if method is None:
        return False
    from binarydm.quant import LSQQuantizer

    if method.progressive.stage_steps > 0:
        return True
    return any(isinstance(m, LSQQuantizer) and not m.enabled for m in model.modules())
