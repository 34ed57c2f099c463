"""What one training worker is asked to do: a typed, picklable ``WorkerJob``.

The driver builds it once (settings, mode, absolute paths, fault plan) and hands it to
the loop: inline directly, under Ray Train as the one value of ``train_loop_config``
(which must be a dict) under ``JOB_KEY``. ``FaultPlan`` is the fault injection of the
fault-tolerance tests (tests/fault), all of it behind one object the loop calls at
fixed points.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from binarydm.train.settings import TrialSettings

JOB_KEY = "job"
HOLD_LIMIT_S = 600.0


@dataclasses.dataclass(frozen=True)
class FaultPlan:
    """Faults to inject, for the fault-tolerance tests; the default injects none.

    ``nan_at_step``: the loss of that step becomes NaN. ``pid_file``: rank ``pid_rank``
    writes its PID there (for a test to kill it). ``fail_at_step``: rank 0 raises a
    simulated CUDA OOM at that step while the counter in ``fail_marker`` is above 0
    (each failure takes one). ``hold_at_step``: rank 0 waits after reporting that step
    while ``hold_file`` exists (a test kills or corrupts meanwhile).
    """

    nan_at_step: int | None = None
    pid_file: str | None = None
    pid_rank: int = 0
    fail_at_step: int | None = None
    fail_marker: str | None = None
    hold_at_step: int | None = None
    hold_file: str | None = None

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(field.name for field in dataclasses.fields(cls))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> FaultPlan:
        """From ``{key: value}`` (``$BINARYDM_FAULTS``, test keywords); unknown keys raise."""
        values = dict(values or {})
        unknown = sorted(set(values) - set(cls.keys()))
        if unknown:
            raise ValueError(
                f"fault key {unknown[0]!r} is invalid: allowed {', '.join(cls.keys())}"
            )
        return cls(**values)

    def on_start(self, rank: int) -> None:
        if self.pid_file and rank == self.pid_rank:
            Path(self.pid_file).write_text(str(os.getpid()))

    def before_step(self, step: int, rank: int) -> None:
        """Raise the simulated OOM of ``fail_at_step`` (what Ray Train would retry)."""
        if step == self.fail_at_step and rank == 0 and self._take_failure():
            raise torch.OutOfMemoryError(
                f"CUDA out of memory at step {step} (simulated by fault injection)"
            )

    def poison(self, step: int, noise: torch.Tensor) -> torch.Tensor:
        """The step's target noise, NaN at ``nan_at_step`` (so its loss is NaN)."""
        return noise * float("nan") if step == self.nan_at_step else noise

    def after_report(self, done: int, start_step: int, rank: int) -> None:
        # Only in the attempt that trained up to it: a resumed run passes the hold.
        if done == self.hold_at_step and start_step < done and rank == 0:
            self._hold()

    def _take_failure(self) -> bool:
        marker = Path(self.fail_marker) if self.fail_marker else None
        if marker is None or not marker.exists():
            return False
        left = int(marker.read_text().strip() or 0)
        if left <= 0:
            return False
        marker.write_text(str(left - 1))
        return True

    def _hold(self) -> None:
        # Bounded, so a test that never releases the hold cannot hang a run forever.
        deadline = time.monotonic() + HOLD_LIMIT_S
        while self.hold_file and Path(self.hold_file).exists() and time.monotonic() < deadline:
            time.sleep(0.1)


@dataclasses.dataclass(frozen=True)
class RungPlan:
    """Where QAT reports its early-stopping proxy, and what the proxy holds.

    ``steps``: the rung steps (none: no rungs). Every rung scores the held-out
    ``proxy/test_loss``; with ``fid_samples`` set it also scores ``proxy/fid``, a small
    FID of that many DDIM samples of ``fid_sampling_steps`` steps (the trial's Inception
    and feature width) against as many reference images.
    """

    steps: tuple[int, ...] = ()
    fid_samples: int | None = None
    fid_sampling_steps: int = 10

    @classmethod
    def of(cls, rungs: RungPlan | tuple[int, ...] | list[int]) -> RungPlan:
        """``rungs`` as a plan: a bare tuple of steps scores the test loss only."""
        return rungs if isinstance(rungs, RungPlan) else cls(steps=tuple(rungs))


@dataclasses.dataclass(frozen=True)
class WorkerJob:
    """One worker's job: train ``mode`` (``teacher`` or ``qat``) with ``settings``.

    Paths are absolute (Tune and Train change working directories). ``evaluate=False``
    ends QAT without its evaluation (tests and benchmarks that time training alone).
    ``rungs``: where QAT reports its early-stopping proxy and what it scores
    (``RungPlan``, from ``search.early_stopping``; no rungs by default).
    """

    settings: TrialSettings
    mode: Literal["teacher", "qat"]
    teacher_dir: str | None = None
    data_root: str | None = None
    cache_dir: str | None = None
    faults: FaultPlan = FaultPlan()
    evaluate: bool = True
    rungs: RungPlan = RungPlan()

    def __post_init__(self) -> None:
        if self.mode not in ("teacher", "qat"):
            raise ValueError(f"mode={self.mode!r} is invalid: allowed teacher, qat")

    def train_loop_config(self) -> dict[str, Any]:
        """Ray Train's ``train_loop_config``: a dict, the job under ``JOB_KEY``."""
        return {JOB_KEY: self}

    @classmethod
    def from_train_loop_config(cls, config: Mapping[str, Any]) -> WorkerJob:
        job = config[JOB_KEY]
        if not isinstance(job, cls):
            raise TypeError(f"train_loop_config[{JOB_KEY!r}] is a {type(job).__name__}")
        return job
