"""Low-rank Representation Mimicking (LRM), method.md section 4.

The binarized student mimics the frozen FP teacher's features, each inside a
low-rank PCA subspace of the teacher's, at the feature points ``config.granularity``
picks (``binarydm.distill.hooks``: every timestep-embedded unit, 25 on
``ddpm-cifar10``, or the 2L+1 block outputs, 9 there; "block" below names either):

    loss_lrm = lambda * mean_over_points( MSE(project(student_p), project(teacher_p)) )

added to the usual noise-prediction loss. Typical use in a training step::

    lrm = LowRankMimicking(student, teacher, config.lrm)   # once; freezes the teacher
    pred = student(x_t, t).sample                          # hooks record student features
    terms = lrm(x_t, t, step=step)                         # teacher forward (no grad) + loss
    loss = F.mse_loss(pred, noise) + terms.weighted
    log(loss_lrm=terms.unweighted.item())                   # unweighted: comparable across lambda

The metric ``loss_lrm`` is the UNWEIGHTED mean (``terms.unweighted``), so trials
that search lambda on a log scale report the same quantity; ``terms.weighted``
is what enters the training loss.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from binarydm.distill.hooks import FeatureRecorder
from binarydm.distill.projection import LowRankProjection
from binarydm.quant.config import LRMConfig


class LRMTerms(NamedTuple):
    """LRM loss of one batch: ``weighted`` (lambda * unweighted) trains, ``unweighted`` logs."""

    weighted: torch.Tensor
    unweighted: torch.Tensor
    per_block: dict[str, torch.Tensor]


class LRMLoss(nn.Module):
    """lambda * mean over blocks of the MSE between projected student and teacher features.

    The projection is computed from the teacher features of the first call (and
    again every ``config.refresh_every`` steps if > 0). Teacher features are
    detached here, so no gradient reaches the teacher even if it was not frozen.
    """

    def __init__(
        self,
        block_names: Iterable[str],
        config: LRMConfig,
        *,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.loss_weight = config.weight  # lambda
        self.projection = LowRankProjection(
            block_names,
            rank_divisor=config.rank_divisor,
            axis=config.axis,
            refresh_every=config.refresh_every,
            process_group=process_group,
        )

    @property
    def block_names(self) -> list[str]:
        return self.projection.block_names

    def forward(
        self,
        student_features: Mapping[str, torch.Tensor],
        teacher_features: Mapping[str, torch.Tensor],
        step: int = 0,
    ) -> LRMTerms:
        teacher_features = {name: feature.detach() for name, feature in teacher_features.items()}
        self.projection.maybe_update(teacher_features, step)
        self.projection.check_blocks(student_features)
        per_block = {
            block: F.mse_loss(
                self.projection.project(block, student_features[block]),
                self.projection.project(block, teacher_features[block]),
            )
            for block in self.block_names
        }
        unweighted = torch.stack(list(per_block.values())).mean()
        return LRMTerms(unweighted * self.loss_weight, unweighted, per_block)

    def extra_repr(self) -> str:
        return f"loss_weight={self.loss_weight}"


class LowRankMimicking:
    """LRM between a student and its frozen FP teacher: hooks on both, the loss, the state.

    Construction freezes the teacher (``requires_grad_(False)``, eval mode) and
    installs a ``FeatureRecorder`` of ``config.granularity`` on each model (build it
    after ``binarize_``: the hooks sit on the modules). After ``student(x_t, t)``, call
    ``lrm(x_t, t, step=step)``: it runs the teacher under ``torch.no_grad`` on the
    same input and returns the ``LRMTerms`` of that batch. Not an ``nn.Module`` on
    purpose (its state dict would swallow both UNets): ``state_dict()`` holds only
    the projections. Raises if ``config.enabled`` is false: skip the teacher
    forward entirely instead.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        config: LRMConfig,
        *,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        if not config.enabled:
            raise ValueError(
                "lrm.enabled=False: build LowRankMimicking only when LRM is on "
                "(and skip the teacher forward otherwise)"
            )
        self.student = student
        self.teacher = teacher.requires_grad_(False).eval()
        self._teacher_call: Any = None  # torch.compile(teacher) after compile_teacher()
        self.student_recorder = FeatureRecorder(student, config.granularity)
        self.teacher_recorder = FeatureRecorder(teacher, config.granularity)
        if self.student_recorder.block_names != self.teacher_recorder.block_names:
            self.remove()
            raise ValueError(
                f"student {config.granularity} points {self.student_recorder.block_names} differ "
                f"from teacher points {self.teacher_recorder.block_names}: the teacher must be "
                "the student's FP copy"
            )
        self.loss_fn = LRMLoss(
            self.student_recorder.block_names, config, process_group=process_group
        )

    @property
    def projection(self) -> LowRankProjection:
        return self.loss_fn.projection

    def compile_teacher(self, **options: Any) -> None:
        """Run the teacher through ``torch.compile(**options)`` from now on (its recording
        hooks too); ``self.teacher`` itself stays the eager module."""
        self._teacher_call = torch.compile(self.teacher, **options)

    @torch.no_grad()
    def teacher_forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the teacher on the student's input; its block outputs are recorded."""
        # A wrapper's .train() call may have reached the teacher: dropout etc. must stay off.
        if self.teacher.training:
            self.teacher.eval()
        call = self.teacher if self._teacher_call is None else self._teacher_call
        return call(*args, **kwargs)

    def loss(self, step: int = 0) -> LRMTerms:
        """LRM terms from the last recorded student and teacher forwards, then forget them."""
        student_features = self.student_recorder.features
        teacher_features = self.teacher_recorder.features
        if not student_features or not teacher_features:
            raise RuntimeError(
                "no features recorded: run student(x_t, t) and teacher_forward(x_t, t) first"
            )
        terms = self.loss_fn(student_features, teacher_features, step)
        # The loss graph keeps what backward needs; holding the dicts would pin the next batch.
        self.student_recorder.clear()
        self.teacher_recorder.clear()
        return terms

    def __call__(self, *args: Any, step: int = 0, **kwargs: Any) -> LRMTerms:
        """Teacher forward on ``(*args, **kwargs)`` (the student's input), then ``loss(step)``."""
        self.teacher_forward(*args, **kwargs)
        return self.loss(step)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.loss_fn.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self.loss_fn.load_state_dict(state_dict)

    def to(self, device: torch.device | str) -> LowRankMimicking:
        """Move the projections (the models are moved by their owner)."""
        self.loss_fn.to(device)
        return self

    def remove(self) -> None:
        """Remove the hooks from both models."""
        self.student_recorder.remove()
        self.teacher_recorder.remove()

    def __enter__(self) -> LowRankMimicking:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
