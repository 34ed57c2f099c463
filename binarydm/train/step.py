"""One optimisation step of BinaryDM QAT or of FP teacher pretraining.

``qat_step`` and ``teacher_step`` are what the training loop runs at every step and
what the benchmarks time, so a benchmark measures the step that trains (LRM term and
EBB penalty included), not a copy of it::

    parts = StepParts(student, torch.optim.AdamW(student.parameters()), lrm=lrm, tau=1e-4)
    losses = qat_step(parts, x_t, t, noise, step=0)
    losses.loss  # == loss_noise + lrm weight * loss_lrm + loss_ebb

A step: forward (teacher first, under autocast), losses, backward, one host sync that
checks every rank's losses are finite (``NonFiniteLossError`` otherwise, before the
weights move), gradient clipping, optimizer and learning-rate scheduler step, EMA
update. Training runs in bf16 autocast, which needs no gradient scaler.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from binarydm.train._ema import ModelEMA


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf: the trial stops and is recorded FAILED with this reason.

    ``step`` is the step whose loss it was; ``loss`` the (non-finite) total on this rank.
    """

    def __init__(self, loss: float, step: int) -> None:
        super().__init__(f"non-finite loss ({loss}) at step {step}")
        self.loss, self.step = loss, step

    @property
    def reason(self) -> str:
        """``NonFiniteLossError: ...``: the line the trial's failure reason shows."""
        return f"{type(self).__name__}: {self}"


@dataclasses.dataclass
class StepParts:
    """The objects one optimisation step reads and updates.

    ``model`` is the eager module (the EBB penalty, clipping and the EMA read it);
    ``forward_model`` the wrapper the forward runs through (DDP, ``torch.compile``;
    None: ``model``). ``tau`` weights the EBB penalty (0: EBB off); ``grad_clip`` is
    the gradient-norm bound (0: none). The EMA is made after the first step (whose
    forward initialises the quantizers) when ``ema_decay`` is set; ``graph_steps``
    marks each step for CUDA graph trees (``mode="reduce-overhead"``).
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any = None
    lrm: Any = None  # binarydm.distill.LowRankMimicking
    ema: ModelEMA | None = None
    ema_decay: float = 0.0
    ema_warmup: bool = True
    forward_model: torch.nn.Module | None = None
    tau: float = 0.0
    grad_clip: float = 0.0
    autocast_dtype: torch.dtype | None = None
    graph_steps: bool = False


@dataclasses.dataclass(frozen=True)
class StepLosses:
    """The step's loss components as host floats; ``loss`` is what was backpropagated.

    ``loss_lrm`` is logged unweighted (the loss holds it times the LRM weight);
    ``loss_ebb`` is the weighted EBB penalty, ``tau * mean(s_2)``.
    """

    loss: float
    loss_noise: float
    loss_lrm: float
    loss_ebb: float

    def values(self) -> tuple[float, float, float, float]:
        """In the order of ``binarydm.train._loop.metrics_keys()``."""
        return (self.loss, self.loss_noise, self.loss_lrm, self.loss_ebb)


def qat_step(
    parts: StepParts, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, *, step: int
) -> StepLosses:
    """One QAT step of the student: noise MSE + weighted LRM term + EBB penalty.

    ``step`` is the training step (the LRM loss schedule reads it). The progressive
    schedule is the caller's (``binarydm.schedule.apply_schedule``) before the step.
    """
    from binarydm.quant import ebb_penalty

    _begin(parts)
    with _autocast(parts, x_t):
        # The frozen teacher first: graph-replayed, it then never runs while the
        # student's backward is pending (which CUDA graph trees handle worse).
        if parts.lrm is not None:
            parts.lrm.teacher_forward(x_t, t)
        pred = _forward(parts, x_t, t)
    loss_noise = F.mse_loss(pred.float(), noise.float())
    loss = loss_noise
    zero = torch.zeros((), device=loss_noise.device)
    loss_lrm = zero
    if parts.lrm is not None:
        terms = parts.lrm.loss(step)
        loss_lrm = terms.unweighted.detach()
        loss = loss + terms.weighted
    loss_ebb = zero
    if parts.tau:
        loss_ebb = parts.tau * ebb_penalty(parts.model)
        loss = loss + loss_ebb
    return _update(parts, step, loss, loss_noise, loss_lrm, loss_ebb)


def teacher_step(
    parts: StepParts, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, *, step: int
) -> StepLosses:
    """One FP teacher pretraining step: the noise MSE alone."""
    _begin(parts)
    with _autocast(parts, x_t):
        pred = _forward(parts, x_t, t)
    loss_noise = F.mse_loss(pred.float(), noise.float())
    zero = torch.zeros((), device=loss_noise.device)
    return _update(parts, step, loss_noise, loss_noise, zero, zero)


def step_values(*losses: torch.Tensor) -> tuple[bool, list[float]]:
    """Whether every rank's losses are finite, and this rank's values: ONE host sync a step.

    The finite flag is all-reduced so every rank stops at the same step; reading it and
    the logged values together keeps the CPU from waiting on the GPU more than once.
    """
    values = torch.stack([loss.detach().float().reshape(()) for loss in losses])
    flag = torch.isfinite(values).all().float().reshape(1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    host = torch.cat([flag, values]).tolist()
    return host[0] > 0, host[1:]


def _begin(parts: StepParts) -> None:
    if parts.graph_steps:
        # CUDA graph trees: a new step begins, the last step's graph outputs are dead.
        torch.compiler.cudagraph_mark_step_begin()


def _autocast(parts: StepParts, x: torch.Tensor):
    dtype = parts.autocast_dtype
    return torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None)


def _forward(parts: StepParts, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    model = parts.forward_model if parts.forward_model is not None else parts.model
    return model(x_t, t).sample


def _update(parts: StepParts, step: int, loss, loss_noise, loss_lrm, loss_ebb) -> StepLosses:
    """Backward, the finiteness check, clip, optimizer, scheduler and EMA steps."""
    parts.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    # The host waits for the GPU once a step, after backward has been queued (waiting
    # before it would leave the GPU idle while the host queues the whole backward);
    # still before the optimizer step, so a non-finite loss never updates the weights.
    finite, values = step_values(loss, loss_noise, loss_lrm, loss_ebb)
    if not finite:
        raise NonFiniteLossError(values[0], step)
    if parts.grad_clip:
        torch.nn.utils.clip_grad_norm_(parts.model.parameters(), parts.grad_clip)
    parts.optimizer.step()
    if parts.lr_scheduler is not None:
        parts.lr_scheduler.step()
    if parts.ema_decay:
        if parts.ema is None:
            parts.ema = ModelEMA(parts.model, parts.ema_decay, warmup=parts.ema_warmup)
        parts.ema.update(parts.model)
    return StepLosses(*values)
