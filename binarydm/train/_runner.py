"""Driver side of one trial: make sure the FP teacher exists, then run QAT on Ray Train.

``fit_qat`` builds a ``TorchTrainer`` (Train V2) whose run name is deterministic
per trial, so a restarted trial or study restores the same run from its
``storage_path`` and resumes from its last checkpoint. With ``workers.inline`` it
runs the one worker in this process instead (``fit_inline``), with the same run
folder, checkpoint retention, retries and result fields. All paths are made
absolute here, before workers start: Tune and Train change working directories.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import traceback
from pathlib import Path
from typing import Any

from binarydm.train.job import FaultPlan, RungPlan, WorkerJob
from binarydm.train.settings import TrialSettings

log = logging.getLogger(__name__)


class TrialError(RuntimeError):
    """A trial that ran but failed (training error, NaN loss, missing evaluation)."""


class DivergedTrialError(TrialError):
    """A trial whose loss became non-finite: deterministic, so never worth a retry."""


def _abs(path: str | os.PathLike | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


def make_trainer(
    settings: TrialSettings,
    *,
    mode: str,
    name: str,
    storage_path: str,
    teacher_dir: str | None,
    data_root: str | None,
    cache_dir: str | None,
    callbacks: list | None = None,
    faults: FaultPlan | None = None,
    evaluate: bool = True,
    rungs: RungPlan | tuple[int, ...] = (),
):
    """A ``TorchTrainer`` running the training loop in ``mode`` (teacher or qat) with the
    settings' workers, failure and checkpoint policy; ``faults``: fault injection
    (tests), ``evaluate=False``: QAT ends without its evaluation, ``rungs``: the steps
    where QAT reports its early-stopping proxy (``WorkerJob.rungs``)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from binarydm.train._loop import train_loop_per_worker

    workers = settings.workers
    resources = {"CPU": workers.cpus_per_worker}
    if workers.use_gpu:
        resources["GPU"] = workers.gpus_per_worker
    job = worker_job(
        settings, mode, teacher_dir, data_root, cache_dir,
        faults=faults, evaluate=evaluate, rungs=rungs,
    )  # fmt: skip
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=job.train_loop_config(),
        scaling_config=ScalingConfig(
            num_workers=workers.num_workers,
            use_gpu=workers.use_gpu,
            resources_per_worker=resources,
        ),
        torch_config=TorchConfig(backend="nccl" if workers.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=_abs(storage_path),
            failure_config=FailureConfig(max_failures=settings.training.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=settings.training.keep_checkpoints),
            callbacks=callbacks or [],
        ),
    )


def worker_job(
    settings: TrialSettings,
    mode: str,
    teacher_dir: str | os.PathLike | None,
    data_root: str | os.PathLike | None,
    cache_dir: str | os.PathLike | None,
    *,
    faults: FaultPlan | None = None,
    evaluate: bool = True,
    rungs: RungPlan | tuple[int, ...] = (),
) -> WorkerJob:
    """The job every worker of a fit runs, its paths absolute."""
    return WorkerJob(
        settings=settings,
        mode=mode,
        teacher_dir=_abs(teacher_dir),
        data_root=_abs(data_root),
        cache_dir=_abs(cache_dir),
        faults=faults or FaultPlan(),
        evaluate=evaluate,
        rungs=RungPlan.of(rungs),
    )


def ensure_teacher(
    settings: TrialSettings,
    *,
    storage_path: str | os.PathLike,
    data_root: str | None = None,
    cache_dir: str | None = None,
) -> Path:
    """The FP teacher's diffusers folder: given, cached, or pretrained now with Ray Train.

    Cached under ``<cache>/teachers/<key>`` by (architecture, data, steps, seed) so every
    study on the same data shares it; a file lock keeps concurrent drivers from
    training it twice, and the folder appears atomically (renamed into place).
    """
    from filelock import FileLock

    from binarydm.models import load_unet

    if settings.teacher.pretrained:
        load_unet(settings.teacher.pretrained)  # fail now, clearly, not inside every worker
        return Path(settings.teacher.pretrained)
    target = cached_teacher_dir(settings, data_root, cache_dir)
    cache, key = target.parent.parent, target.name
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").exists():
            return target
        trainer = make_trainer(
            settings,
            mode="teacher",
            name=f"teacher-{key}",
            storage_path=storage_path,
            teacher_dir=None,
            data_root=data_root,
            cache_dir=str(cache),
        )
        result = trainer.fit()
        try:
            final_metrics(result)
        except TrialError as exc:
            raise TrialError(f"teacher pretraining failed: {exc}") from None
        with result.checkpoint.as_directory() as ckpt:
            staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{key}-"))
            shutil.copytree(Path(ckpt) / "unet", staging, dirs_exist_ok=True)
            os.replace(staging, target)
    return target


def cached_teacher_dir(settings: TrialSettings, data_root=None, cache_dir=None) -> Path:
    """Where ``ensure_teacher`` caches the FP teacher of ``settings`` (it holds a
    ``config.json`` once trained)."""
    from binarydm.data import cache_dir as resolve_cache_dir
    from binarydm.models import teacher_cache_key

    cache = Path(resolve_cache_dir(cache_dir))
    teacher = settings.teacher
    data = settings.data
    key = teacher_cache_key(
        teacher.preset,
        data.source,
        dataset_sha256(settings, data_root, str(cache)),
        data.resolution,
        teacher.steps,
        teacher.seed,
        extra={
            "batch_size": teacher.batch_size,
            "lr": teacher.lr,
            "channels": data.channels,
            "ema_decay": teacher.ema_decay,
        },
    )
    return cache / "teachers" / key


def dataset_sha256(settings: TrialSettings, data_root=None, cache_dir=None) -> str:
    """sha256 of the training images as read (the run param ``data.sha256``)."""
    from binarydm.data import load_split

    data = settings.data
    split = load_split(
        data.source,
        "train",
        data_root=data_root,
        cache_dir=cache_dir,
        limit=data.train_limit,
        path=data.path,
        image_size=data.resolution,
    )
    return split.sha256


def fit_qat(
    settings: TrialSettings,
    *,
    name: str,
    storage_path: str | os.PathLike,
    teacher_dir: str | os.PathLike,
    data_root: str | None = None,
    cache_dir: str | None = None,
    callbacks: list | None = None,
    faults: FaultPlan | None = None,
    evaluate: bool = True,
    rungs: RungPlan | tuple[int, ...] = (),
):
    """Run (or resume) the QAT of one trial; returns Ray Train's ``Result`` (or, inline,
    an ``InlineResult`` with the same fields). ``faults``, ``evaluate`` and ``rungs``: as
    for ``make_trainer``."""
    if settings.workers.inline:
        job = worker_job(
            settings, "qat", teacher_dir, data_root, cache_dir,
            faults=faults, evaluate=evaluate, rungs=rungs,
        )  # fmt: skip
        return fit_inline(job, name=name, storage_path=storage_path, callbacks=callbacks)
    trainer = make_trainer(
        settings,
        mode="qat",
        name=name,
        storage_path=str(storage_path),
        teacher_dir=str(teacher_dir),
        data_root=data_root,
        cache_dir=cache_dir,
        callbacks=callbacks,
        faults=faults,
        evaluate=evaluate,
        rungs=rungs,
    )
    return trainer.fit()


def final_metrics(result) -> dict[str, Any]:
    """The evaluation metrics of a finished QAT run, or TrialError with the reason
    (``DivergedTrialError`` where the loss became non-finite)."""
    if result.error is not None:
        raise TrialError(str(result.error))
    metrics = dict(result.metrics or {})
    if metrics.get("error"):
        kind = DivergedTrialError if metrics.get("diverged") else TrialError
        raise kind(metrics["error"])
    if not metrics.get("final"):
        raise TrialError("training ended without its final evaluation report")
    return metrics


@dataclasses.dataclass
class InlineResult:
    """What ``fit_inline`` returns: the fields of Ray Train's ``Result`` that we read."""

    metrics: dict[str, Any] | None
    checkpoint: Any  # ray.train.Checkpoint of the newest persisted checkpoint, or None
    error: BaseException | None
    path: str


def fit_inline(
    job: WorkerJob,
    *,
    name: str,
    storage_path: str | os.PathLike,
    callbacks: list | None = None,
) -> InlineResult:
    """Run (or resume) one trial's QAT in this process; the one-worker ``fit_qat``.

    The run folder is ``<storage_path>/<name>`` as for a Ray Train run, so a retried
    trial resumes from its newest checkpoint. A raising loop is run again from that
    checkpoint up to ``training.max_failures`` times (-1: without limit), as Ray Train
    restarts its workers; the last error is the result's ``error``. ``callbacks`` are
    Ray Train user callbacks: their ``after_report`` sees every report.
    """
    import ray.train

    from binarydm.train._loop import run_loop
    from binarydm.train._session import InlineSession, inline_device

    settings = job.settings
    run_dir = Path(_abs(storage_path)) / name

    def on_report(metrics: dict[str, Any], path: str | None) -> None:
        checkpoint = None if path is None else ray.train.Checkpoint.from_directory(path)
        for callback in callbacks or []:
            callback.after_report(None, [metrics], checkpoint)

    session = InlineSession(
        run_dir,
        inline_device(settings.workers.use_gpu),
        keep=settings.training.keep_checkpoints,
        on_report=on_report,
    )
    failures, limit, error = 0, settings.training.max_failures, None
    while True:
        try:
            run_loop(job, session)
            error = None
            break
        except Exception as exc:  # what Ray Train's FailureConfig would retry
            error = exc
            failures += 1
            if limit != -1 and failures > limit:
                break
            log.warning(
                "inline run %s failed (%d of %s retries), resuming from its newest checkpoint: %s",
                name, failures, limit, "".join(traceback.format_exception_only(exc)).strip(),
            )  # fmt: skip
            if session.device.type == "cuda":
                torch_cuda_release()
    latest = session.last_checkpoint or session.checkpoint_path()
    return InlineResult(
        metrics=session.last_metrics,
        checkpoint=None if latest is None else ray.train.Checkpoint.from_directory(latest),
        error=error,
        path=str(run_dir),
    )


def torch_cuda_release() -> None:
    """Give the failed attempt's cached GPU memory back before the next one (an OOM retry
    would otherwise start with the memory the failure left allocated in the cache)."""
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()
