"""Run a study: Ray Tune + OptunaSearch over Ray Train trials, MLflow parent run, Pareto front.

``run_study`` is what ``bdm-search FILE`` calls. It resolves every path in the
driver, connects to Ray (a local cluster by default), makes sure the shared FP
teacher exists before any trial starts, and then either starts the Tune
experiment or restores it (``resume=True``) from its storage path, in which case
finished trials are not rerun and unfinished ones continue under their own
Optuna trial and MLflow run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from binarydm.search.study import StudySpec

log = logging.getLogger(__name__)


class StudyError(RuntimeError):
    """A study that cannot start or continue (the message says what to do)."""


def connect_ray(address: str | None, *, verbose: bool = False, timeout_s: float = 30.0) -> None:
    """Join ``address`` (an existing cluster) or start a local one; fail fast if it is silent."""
    import ray

    if ray.is_initialized():
        return
    if address:
        _check_reachable(address, timeout_s)
    ray.init(
        address=address or None,
        include_dashboard=False if not address else None,
        log_to_driver=verbose,
        configure_logging=True,
        logging_level=logging.INFO if verbose else logging.WARNING,
    )


def _check_reachable(address: str, timeout_s: float) -> None:
    """Ray's own connect retries for minutes; answer within ``timeout_s`` instead."""
    import socket
    from urllib.parse import urlparse

    if address == "auto":
        return
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    host, port = parsed.hostname, parsed.port
    if host is None or port is None:
        raise StudyError(f"--address={address!r} is invalid: expected HOST:PORT or ray://HOST:PORT")
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise StudyError(
            f"--address={address!r} does not answer ({exc}); start the head with "
            "`ray start --head` or leave --address out for a local cluster"
        ) from None


def _study_file_text(spec: StudySpec) -> str:
    if spec.source and Path(spec.source).is_file():
        return Path(spec.source).read_text()
    import yaml

    return yaml.safe_dump(spec.to_dict(), sort_keys=False)


def _shared_teacher(spec: StudySpec, cache_dir: str) -> str | None:
    """Pretrain the teacher once, before trials, unless the space changes it per trial."""
    from binarydm.train.runner import ensure_teacher

    if any(k.startswith(("teacher.", "data.")) for k in spec.search.space):
        return None  # each trial ensures (and caches) its own
    settings = spec.trial_settings({}, spec.search.seeds[0])
    storage = str(Path(spec.storage.ray_results) / "teachers")
    return str(ensure_teacher(settings, storage_path=storage, data_root=settings.data.root,
                              cache_dir=cache_dir))  # fmt: skip


def _searcher(spec: StudySpec):
    import optuna

    from binarydm.search.searcher import BinaryDMOptunaSearch
    from binarydm.search.space import build_sampler, optuna_space

    search = spec.search
    storage = optuna.storages.RDBStorage(spec.storage.optuna)
    return BinaryDMOptunaSearch(
        space=optuna_space(search),
        metric=search.metrics,
        mode=search.tune_modes,
        sampler=build_sampler(search),
        storage=storage,
        study_name=spec.name,
    )


def _driver_resources(spec: StudySpec) -> dict[str, float]:
    """What each trial's driver reserves beside its Ray Train workers.

    With ``cpus_per_trial = 0`` the driver only waits on its workers; Ray refuses an empty
    request, so it reserves a token of memory instead of a CPU the workers need.
    """
    if spec.resources.cpus_per_trial > 0:
        return {"CPU": spec.resources.cpus_per_trial}
    return {"memory": 64 * 2**20}


def run_study(
    spec: StudySpec,
    *,
    address: str | None = None,
    resume: bool = False,
    verbose: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Run (or resume) the study; returns the Pareto summary (see ``analysis.summarize``)."""
    from ray import tune

    from binarydm.data import cache_dir as resolve_cache_dir
    from binarydm.search.analysis import summarize
    from binarydm.search.callbacks import StudyProgress
    from binarydm.search.trainable import StudyContext, run_trial
    from binarydm.tracking import StudyTracker

    # Training reports (loss curves) come before the objectives, which arrive at the end.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    spec = spec.resolve_paths()
    cache_dir = str(resolve_cache_dir(None))
    connect_ray(address, verbose=verbose)
    import ray

    tracker = StudyTracker(
        spec.tracking.uri, spec.tracking.experiment, spec.name, spec.tracking.artifact_location
    )
    parent = tracker.parent_run_id()
    tracker.set_running(parent)
    tracker.set_tags(parent, {"profile": spec.profile or "none"})
    study_text = _study_file_text(spec)
    experiment_path = Path(spec.storage.ray_results) / spec.name
    if experiment_path.exists() and not resume and tune.Tuner.can_restore(str(experiment_path)):
        raise StudyError(
            f"study {spec.name!r} already has results in {experiment_path}; "
            "pass --resume to continue it, or give the study another name"
        )
    teacher = _shared_teacher(spec, cache_dir)
    context = StudyContext(spec, teacher, cache_dir, parent, study_text)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, context=context), _driver_resources(spec)
    )
    cluster = ray.cluster_resources()
    concurrency = spec.max_concurrent_trials(cluster.get("CPU", 1), cluster.get("GPU", 0))
    progress = StudyProgress(list(spec.search.space), spec.search.metrics, enabled=show_progress)
    if resume and tune.Tuner.can_restore(str(experiment_path)):
        tuner = tune.Tuner.restore(
            str(experiment_path), trainable=trainable, resume_unfinished=True,
            resume_errored=False, restart_errored=False,
        )  # fmt: skip
    else:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=_searcher(spec),
                num_samples=spec.search.trials,
                max_concurrent_trials=concurrency,
            ),
            run_config=tune.RunConfig(
                name=spec.name,
                storage_path=spec.storage.ray_results,
                callbacks=[progress],
                verbose=0,
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )
    tuner.fit()
    objectives = list(zip(spec.search.metrics, spec.search.directions, strict=True))
    summary = summarize(
        tracker,
        objectives,
        reference_point=spec.search.reference_point,
        study_file_text=study_text,
    )
    tracker.finish_study("FINISHED")
    return summary
