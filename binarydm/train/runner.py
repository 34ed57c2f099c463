"""Driver side of one trial: make sure the FP teacher exists, then run QAT on Ray Train.

``fit_qat`` builds a ``TorchTrainer`` (Train V2) whose run name is deterministic
per trial, so a restarted trial or study restores the same run from its
``storage_path`` and resumes from its last checkpoint. All paths are made
absolute here, before workers start: Tune and Train change working directories.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from binarydm.train.settings import TrialSettings


class TrialError(RuntimeError):
    """A trial that ran but failed (training error, NaN loss, missing evaluation)."""


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
    extra_config: dict[str, Any] | None = None,
):
    """A ``TorchTrainer`` running the training loop in ``mode`` (teacher or qat) with the
    settings' workers, failure and checkpoint policy; ``extra_config`` adds worker-config
    keys (fault injection, ``evaluate``)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from binarydm.train.loop import train_loop_per_worker

    workers = settings.workers
    resources = {"CPU": workers.cpus_per_worker}
    if workers.use_gpu:
        resources["GPU"] = workers.gpus_per_worker
    config = {
        "settings": settings.to_dict(),
        "mode": mode,
        "teacher_dir": _abs(teacher_dir),
        "data_root": _abs(data_root),
        "cache_dir": _abs(cache_dir),
        **(extra_config or {}),
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
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

    from binarydm.data import cache_dir as resolve_cache_dir
    from binarydm.models import load_unet, teacher_cache_key

    if settings.teacher.pretrained:
        load_unet(settings.teacher.pretrained)  # fail now, clearly, not inside every worker
        return Path(settings.teacher.pretrained)
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
        extra={"batch_size": teacher.batch_size, "lr": teacher.lr, "channels": data.channels},
    )
    target = cache / "teachers" / key
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
    extra_config: dict[str, Any] | None = None,
):
    """Run (or resume) the QAT of one trial; returns Ray Train's ``Result``."""
    trainer = make_trainer(
        settings,
        mode="qat",
        name=name,
        storage_path=str(storage_path),
        teacher_dir=str(teacher_dir),
        data_root=data_root,
        cache_dir=cache_dir,
        callbacks=callbacks,
        extra_config=extra_config,
    )
    return trainer.fit()


def final_metrics(result) -> dict[str, Any]:
    """The evaluation metrics of a finished QAT run, or TrialError with the reason."""
    if result.error is not None:
        raise TrialError(str(result.error))
    metrics = dict(result.metrics or {})
    if metrics.get("error"):
        raise TrialError(metrics["error"])
    if not metrics.get("final"):
        raise TrialError("training ended without its final evaluation report")
    return metrics
