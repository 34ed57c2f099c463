"""Where the training loop runs: a Ray Train worker, or inline in the calling process.

The loop asks its session for its rank, world size and device, the checkpoint to
resume from, the DDP wrapper, and where reports go. ``RayTrainSession`` delegates to
``ray.train`` inside a ``TorchTrainer`` worker. ``InlineSession`` runs the single
worker of a one-worker trial in the current process (a Ray Tune trial actor): no Train
controller, placement group, worker actor or process group is started and stopped
around a short trial (8 s on an idle CPU, about 40 s a trial with 8 trials starting at
once on a GPU host; benchmarks/results/gpu_perf.md). Checkpoints are persisted like
Ray Train's (``CheckpointStore``): one folder per report under the run's folder, the
newest ``keep`` kept, registered in ``checkpoints.json`` only once fully written, so a
killed trial resumes from the newest complete one. Whichever the session, the loop
writes every checkpoint through ``report_checkpoint``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

INDEX_FILE = "checkpoints.json"


class RayTrainSession:
    """The loop inside a Ray Train worker (``TorchTrainer``)."""

    # Ray Train persists reported checkpoints where the worker does not track them: the
    # final checkpoint saves its state again rather than linking the last step's.
    last_checkpoint = None

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()

    def checkpoint_dir(self):
        """A scratch folder to write a checkpoint in; Ray Train copies it on report."""
        return tempfile.TemporaryDirectory()

    def checkpoint_path(self) -> str | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        return None if checkpoint is None else checkpoint.path

    def prepare_model(self, model: torch.nn.Module, *, find_unused: bool) -> torch.nn.Module:
        import ray.train.torch

        # Ray wraps in DDP only when the world size is above 1.
        return ray.train.torch.prepare_model(
            model,
            move_to_device=False,
            parallel_strategy_kwargs={"find_unused_parameters": find_unused},
        )

    def report(self, metrics: dict[str, Any], directory: str | None, name: str | None) -> None:
        """Report ``metrics``, with ``directory`` as a checkpoint named ``name`` if given.

        Every rank reports (Ray Train's reports are collective); only rank 0 passes a
        directory.
        """
        import ray.train

        checkpoint = None if directory is None else ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)


class CheckpointStore:
    """The checkpoint folders of one inline run, persisted as Ray Train persists its own.

    One folder per checkpoint under ``run_dir``, renamed into place once complete,
    registered in ``checkpoints.json`` (``INDEX_FILE``) only then, the newest ``keep``
    kept (None: all): a killed run resumes from the newest complete one.
    """

    def __init__(self, run_dir: str | os.PathLike, *, keep: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.keep = keep

    def registered(self) -> list[str]:
        """Names of the persisted checkpoints, oldest first."""
        try:
            names = json.loads((self.run_dir / INDEX_FILE).read_text())
        except (OSError, ValueError):
            return []
        return [n for n in names if (self.run_dir / n).is_dir()]

    def latest(self) -> str | None:
        names = self.registered()
        return str(self.run_dir / names[-1]) if names else None

    @contextlib.contextmanager
    def staging(self) -> Iterator[str]:
        """A staging folder inside the run folder: ``persist`` renames it into place
        instead of copying (a ddpm-cifar10 state with optimizer and EMA is about 570 MB)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        staging = tempfile.mkdtemp(dir=self.run_dir, prefix=".staging-")
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone already when persisted

    def persist(self, source: str | os.PathLike, name: str) -> str:
        """Place ``source`` as ``name`` and register it at once (``place`` + ``register``)."""
        target = self.place(source, name)
        self.register(name)
        return target

    def place(self, source: str | os.PathLike, name: str) -> str:
        """Move (or copy) ``source`` into the run folder as ``name``, not yet registered:
        a run killed now resumes from the checkpoint before it; returns the folder."""
        source, target = Path(source), self.run_dir / name
        if source.parent.resolve() == self.run_dir.resolve():
            staging = source  # from staging(): complete, on the same file system
        else:
            # Copied beside its final place and renamed: a crash mid-copy leaves no folder
            # that looks like a checkpoint.
            staging = Path(tempfile.mkdtemp(dir=self.run_dir, prefix=f".{name}-"))
            shutil.copytree(source, staging, dirs_exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
        return str(target)

    def register(self, name: str) -> None:
        """Name the placed checkpoint ``name`` newest in the index; evict the oldest
        beyond ``keep``."""
        names = [n for n in self.registered() if n != name] + [name]
        evicted = []
        if self.keep is not None and len(names) > self.keep:
            evicted, names = names[: -self.keep], names[-self.keep :]
        self._write_index(names)
        for old in evicted:  # after the index no longer names them
            shutil.rmtree(self.run_dir / old, ignore_errors=True)

    def _write_index(self, names: list[str]) -> None:
        tmp = self.run_dir / f".{INDEX_FILE}.tmp"
        tmp.write_text(json.dumps(names))
        os.replace(tmp, self.run_dir / INDEX_FILE)


class InlineSession:
    """The loop of a one-worker trial run in this process, checkpoints under ``run_dir``.

    ``on_report(metrics, checkpoint_path)`` sees every report (the trial's live curve and
    Ray Tune's results); ``keep`` is how many checkpoints stay (None: all).
    """

    rank = 0
    world_size = 1

    def __init__(
        self,
        run_dir: str | os.PathLike,
        device: torch.device,
        *,
        keep: int | None = None,
        on_report: Callable[[dict[str, Any], str | None], None] | None = None,
    ) -> None:
        self.store = CheckpointStore(run_dir, keep=keep)
        self.store.run_dir.mkdir(parents=True, exist_ok=True)
        self.device = device
        self.on_report = on_report
        self.last_metrics: dict[str, Any] | None = None
        self.last_checkpoint: str | None = None

    @property
    def run_dir(self) -> Path:
        return self.store.run_dir

    def registered(self) -> list[str]:
        """Names of the persisted checkpoints, oldest first."""
        return self.store.registered()

    def checkpoint_dir(self):
        return self.store.staging()

    def checkpoint_path(self) -> str | None:
        return self.store.latest()

    def prepare_model(self, model: torch.nn.Module, *, find_unused: bool) -> torch.nn.Module:
        return model  # one worker: nothing to synchronise

    def report(self, metrics: dict[str, Any], directory: str | None, name: str | None) -> None:
        """Report ``metrics``, with ``directory`` as the checkpoint ``name`` if given.

        The checkpoint is registered only after ``on_report`` returned (its curve point
        logged, Ray Tune's blocking report taken by the driver), as Ray Train registers a
        checkpoint with its report's metrics: a trial killed in between resumes from the
        checkpoint before and trains the step again, rather than resuming past a step
        whose metrics never reached the run.
        """
        path = None
        if directory is not None:
            path = self.store.place(directory, name or "checkpoint")
        self.last_metrics = dict(metrics)
        if self.on_report is not None:
            self.on_report(dict(metrics), path)
        if path is not None:
            self.store.register(name or "checkpoint")
            self.last_checkpoint = path


def report_checkpoint(
    session,
    metrics: dict[str, Any],
    name: str,
    write: Callable[[Path, dict[str, Any]], None],
) -> None:
    """Report ``metrics`` with a checkpoint named ``name``: THE way the loop persists one.

    Rank 0 writes it with ``write(folder, metrics)`` (which may add to ``metrics``) in
    the session's staging folder; the session persists it on report (Ray Train copies it
    to the run's storage, ``InlineSession`` renames it into its ``CheckpointStore``).
    Every rank reports: Ray Train's reports are collective.
    """
    with session.checkpoint_dir() as staging:
        directory = None
        if session.rank == 0:
            write(Path(staging), metrics)
            directory = staging
        session.report(metrics, directory, name)


def inline_device(use_gpu: bool) -> torch.device:
    """The device of an inline run: the first GPU Ray assigned to this actor, else CPU.

    Ray sets ``CUDA_VISIBLE_DEVICES`` for an actor that reserved GPUs (fractions
    included), so the assigned card is always ``cuda:0`` here.
    """
    if use_gpu:
        if not torch.cuda.is_available():
            raise RuntimeError("workers.use_gpu is set but this trial's process sees no GPU")
        torch.cuda.set_device(0)
        return torch.device("cuda", 0)
    return torch.device("cpu")
