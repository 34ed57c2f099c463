"""Run a study: Ray Tune + OptunaSearch over Ray Train trials, MLflow parent run, Pareto front.

``run_study`` is what ``bdm-search FILE`` calls. It resolves every path in the
driver, checks what it can before Ray starts (data, a local teacher, the MLflow
server, the Optuna storage), connects to Ray (a local cluster by default), makes
sure the shared FP teacher exists before any trial starts, and then either starts
the Tune experiment or restores it (``resume=True``) from its storage path, in
which case finished trials are not rerun and unfinished ones continue under their
own Optuna trial and MLflow run. Optuna trials that a killed driver left RUNNING
and that no restored Tune trial will finish are settled on resume (FAIL, or
COMPLETE when their MLflow run finished), so no trial stays RUNNING forever.
Beside the trials, the study's FP teacher is scored once with the trials' own
evaluation settings (``binarydm.search._reference``): launched before Tune starts,
collected after it ends, reused by a resume or by a later study of the same key.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from binarydm.metric_contract import TUNE_STARTED_TAG
from binarydm.search._console import (
    ANALYSIS_LOG,
    loud_ray_output,
    mask_secrets,
    quiet_library_notices,
    quiet_ray_output,
    results_location,
    teacher_notice,
    tune_output,
    worker_progress,
)
from binarydm.search._preflight import (
    StudyError,
    check_reachable,
    loopback_only,
    preflight,
    sqlite_init_lock,
)
from binarydm.spec import StudySpec, is_uri

log = logging.getLogger(__name__)

#: JSON ``{"<Optuna trial number>" or "*": {worker-config fault key: value}}``: fault
#: injection for the fault-tolerance tests (keys: ``binarydm.train._loop.FAULT_KEYS``).
FAULTS_ENV = "BINARYDM_FAULTS"
ORPHAN_REASON = (
    "orphaned: the study's driver was killed after Optuna created this trial and before "
    "Ray Tune recorded it, so no restored Tune trial continues it"
)


#: ``settle_orphans``' state of a RUNNING trial left to the new Tune experiment.
CONTINUED = "CONTINUED"


class StudyInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the study; Tune, Optuna and MLflow kept what it had, for ``--resume``."""

    def __init__(self, unfinished: set[int]):
        super().__init__(f"interrupted with trials {sorted(unfinished)} unfinished")
        self.unfinished = unfinished


def connect_ray(
    address: str | None, *, verbose: bool = False, timeout_s: float = 30.0
) -> str | None:
    """Join ``address`` (an existing cluster) or start a local one; fail fast if it is silent.

    Returns the Ray dashboard's URL when the cluster runs one (None otherwise).
    """
    import ray

    if ray.is_initialized():
        return None
    if address:
        check_reachable(address, timeout_s)
    elif not os.environ.get("RAY_ADDRESS"):  # set by `ray job submit`: joins, starts nothing
        loopback_only()
    if verbose:
        loud_ray_output()
    else:
        quiet_ray_output()
    try:
        context = ray.init(
            address=address or None,
            include_dashboard=False if not address else None,
            log_to_driver=True,  # filtered by quiet_ray_output unless verbose
            configure_logging=True,
            logging_level=logging.INFO if verbose else logging.WARNING,
        )
    except Exception as exc:  # Ray raises a bare Exception for a node that never came up
        # Whatever it started before failing (GCS, raylet) goes with it.
        ray.shutdown()
        raise StudyError(ray_start_failure(address, exc)) from exc
    url = getattr(context, "dashboard_url", None)
    return f"http://{url}" if url and not is_uri(url) else url or None


def ray_start_failure(address: str | None, exc: BaseException) -> str:
    """One line for a Ray cluster that could not be started or joined, with what to check."""
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    cause = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    if address or os.environ.get("RAY_ADDRESS"):
        where = address or os.environ["RAY_ADDRESS"]
        return (
            f"the Ray cluster at {where} could not be joined ({cause}); check that it runs "
            "the same Ray version (ray status there) and that RAY_AUTH_MODE=token is set "
            "where it uses token auth; --verbose shows Ray's own output"
        )
    tmpdir = os.environ.get("RAY_TMPDIR", "/tmp")
    return (
        f"the local Ray cluster could not start ({cause}); check that RAY_TMPDIR "
        f"({tmpdir}) is a writable folder with free space and that the machine is not "
        "overloaded (Ray waits 30 s for its node), then run the command again, or join a "
        "running cluster with --address; --verbose shows Ray's own output"
    )


def _study_file_text(spec: StudySpec) -> str:
    """The study file as logged on the parent run, database passwords masked."""
    if spec.source and Path(spec.source).is_file():
        return mask_secrets(Path(spec.source).read_text())
    import yaml

    return mask_secrets(yaml.safe_dump(spec.to_dict(), sort_keys=False))


def fault_injection() -> dict[str, dict[str, Any]]:
    """The fault-injection plan from ``$BINARYDM_FAULTS`` (empty when unset)."""
    from binarydm.train import FAULT_KEYS

    text = os.environ.get(FAULTS_ENV, "").strip()
    if not text:
        return {}
    try:
        plan = json.loads(text)
    except ValueError as exc:
        raise StudyError(f"{FAULTS_ENV}={text!r} is invalid: {exc}") from None
    if not isinstance(plan, dict) or not all(isinstance(v, dict) for v in plan.values()):
        raise StudyError(f"{FAULTS_ENV}={text!r} is invalid: allowed {{trial: {{key: value}}}}")
    for faults in plan.values():
        unknown = sorted(set(faults) - set(FAULT_KEYS))
        if unknown:
            raise StudyError(
                f"{FAULTS_ENV} key {unknown[0]!r} is invalid: allowed {', '.join(FAULT_KEYS)}"
            )
    return {str(k): v for k, v in plan.items()}


def _optuna_storage(spec: StudySpec):
    """The study's Optuna storage, opened now so a bad URL fails before any trial."""
    import optuna

    try:
        with sqlite_init_lock(spec.storage.optuna):
            return optuna.storages.RDBStorage(spec.storage.optuna)
    except Exception as exc:  # SQLAlchemy, driver and Optuna errors share no base class
        detail = mask_secrets(str(exc).strip().splitlines()[0] if str(exc).strip() else "")
        raise StudyError(
            f"storage.optuna={mask_secrets(spec.storage.optuna)!r} cannot be opened "
            f"({type(exc).__name__}: {detail}); allowed: a reachable database URL such as "
            "sqlite:///optuna.db or postgresql://USER:PASSWORD@HOST/DB"
        ) from None


def shared_teacher(
    spec: StudySpec, cache_dir: str, say: Callable[[str], None] = log.info
) -> str | None:
    """Pretrain the teacher once, before trials, unless the space changes it per trial;
    ``say`` is told whether a cached one is reused or one is pretrained (its workers'
    progress bar, with an ETA, shows meanwhile)."""
    from binarydm.train import cached_teacher_dir, ensure_teacher

    if any(k.startswith(("teacher.", "data.")) for k in spec.search.space):
        say("FP teacher: each trial pretrains or reuses its own (the space varies it)")
        return None  # each trial ensures (and caches) its own
    settings = spec.trial_settings({}, spec.search.seeds[0])
    data_root = settings.data.root
    cached = None
    if not settings.teacher.pretrained:
        cached = cached_teacher_dir(settings, data_root, cache_dir)
    say(teacher_notice(settings, cached))
    storage = str(Path(spec.storage.ray_results) / "teachers")
    with worker_progress():
        return str(ensure_teacher(settings, storage_path=storage, data_root=data_root,
                                  cache_dir=cache_dir))  # fmt: skip


def _searcher(spec: StudySpec, storage, continued: tuple[int, ...] = ()):
    from binarydm.search._sampling import build_sampler, optuna_space
    from binarydm.search._searcher import BinaryDMOptunaSearch

    search = spec.search
    return BinaryDMOptunaSearch(
        space=optuna_space(search),
        metric=search.metrics,
        mode=search.tune_modes,
        sampler=build_sampler(search),
        storage=storage,
        study_name=spec.name,
        continued=continued,
    )


def early_stopping_scheduler(spec: StudySpec):
    """The study's Tune scheduler: MO-ASHA under ``search.early_stopping`` (unless
    ``stop: false``), else FIFO."""
    from binarydm.search._early_stop import MOASHAScheduler
    from binarydm.spec import cost_objectives

    early = spec.search.early_stopping
    if not (early.enabled and early.stop):
        return None  # FIFO; with stop: false the rungs are still scored and logged
    directions = dict(zip(spec.search.metrics, spec.search.directions, strict=True))
    costs = [(m, directions[m]) for m in cost_objectives(spec.search.metrics)]
    return MOASHAScheduler(costs, early.reduction_factor, proxy=early.metric, ranking=early.ranking)


def _driver_resources(spec: StudySpec) -> dict[str, float]:
    """What each trial's driver reserves beside its Ray Train workers.

    With ``cpus_per_trial = 0`` the driver only waits on its workers; Ray refuses an empty
    request, so it reserves a token of memory instead of a CPU the workers need. An
    inline trial (``workers.inline``) is its own worker and reserves the worker's share.
    """
    workers = spec.settings.workers
    if workers.inline:
        resources = {"CPU": spec.resources.cpus_per_trial + workers.cpus_per_worker}
        if workers.use_gpu:
            resources["GPU"] = workers.gpus_per_worker
        return resources
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
    on_start: Callable[[dict[str, Any]], None] | None = None,
    say: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the study; returns the Pareto summary (see ``analysis.summarize``).

    ``on_start`` is called, before the first trial, with where the results go
    (``results_location``); the summary carries the same under ``"location"``. ``say``
    gets one-line notices for the terminal (the FP teacher reused or pretrained).
    """
    from ray import tune

    from binarydm.data import cache_dir as resolve_cache_dir
    from binarydm.search._analysis import summarize
    from binarydm.search._callbacks import PrunedRunRecorder, StudyProgress
    from binarydm.search._reference import finish_reference, start_reference
    from binarydm.search._trainable import StudyContext, run_trial
    from binarydm.tracking import StudyTracker

    # Training reports (loss curves) come before the objectives, which arrive at the end.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    if not verbose:  # Tune.restore's warning of trials with no result yet, which resumes expect
        logging.getLogger(ANALYSIS_LOG).setLevel(logging.ERROR)
        import optuna

        # Optuna's "A new study created in RDB" line: the results' location says where.
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        quiet_library_notices()
    spec = spec.resolve_paths()
    cache_dir = str(resolve_cache_dir(None))
    faults = fault_injection()
    preflight(spec, cache_dir, address)
    storage = _optuna_storage(spec)
    experiment_path = Path(spec.storage.ray_results) / spec.name
    # Before anything touches MLflow: a refused run must not reopen the parent run.
    if experiment_path.exists() and not resume and tune.Tuner.can_restore(str(experiment_path)):
        raise StudyError(
            f"study {spec.name!r} already has results in {experiment_path}; "
            "pass --resume to continue it, or give the study another name"
        )
    dashboard = connect_ray(address, verbose=verbose)
    import ray

    tracker = StudyTracker.for_study(spec)
    with sqlite_init_lock(spec.tracking.uri):
        parent = tracker.parent_run_id()
    location = results_location(spec, tracker.experiment_id, dashboard)
    if on_start is not None:
        on_start(location)
    tracker.set_running(parent)
    tracker.set_tags(parent, {"profile": spec.profile or "none"})
    study_text = _study_file_text(spec)
    teacher = shared_teacher(spec, cache_dir, say or log.info)
    context = StudyContext(spec, teacher, cache_dir, parent, study_text, faults)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, context=context), _driver_resources(spec)
    )
    cluster = ray.cluster_resources()
    concurrency = spec.max_concurrent_trials(cluster.get("CPU", 1), cluster.get("GPU", 0))
    progress = StudyProgress(
        list(spec.search.space), spec.search.metrics, enabled=show_progress,
        steps=spec.settings.training.steps, seeds=len(spec.search.seeds),
    )  # fmt: skip
    callbacks = [progress, PrunedRunRecorder(spec)]
    restorable = resume and tune.Tuner.can_restore(str(experiment_path))
    if restorable:
        tuner = tune.Tuner.restore(
            str(experiment_path), trainable=trainable, resume_unfinished=True,
            resume_errored=False, restart_errored=False,
        )  # fmt: skip
    continued: tuple[int, ...] = ()
    budget = spec.search.trials
    if resume:
        owned = _unfinished_trial_numbers(experiment_path) if restorable else set()
        settled = settle_orphans(spec, storage, tracker, owned, keep_unfinished=not restorable)
        if not restorable:
            # No Tune experiment (a study recreated from a run archive, or one whose
            # ray_results went): the Optuna study is the record. Its unfinished trials
            # continue first, and the budget counts the trials it has already ended, but
            # never leaves one of them RUNNING for good (a lowered --trials).
            continued = tuple(n for n, state in settled.items() if state == CONTINUED)
            remaining = spec.search.trials - _ended_trial_count(spec, storage)
            budget = max(remaining, len(continued))
    if not restorable:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=_searcher(spec, storage, continued),
                num_samples=budget,
                max_concurrent_trials=concurrency,
                reuse_actors=spec.resources.reuse_actors,
                scheduler=early_stopping_scheduler(spec),
            ),
            run_config=tune.RunConfig(
                name=spec.name,
                storage_path=spec.storage.ray_results,
                callbacks=callbacks,
                verbose=1 if verbose else 0,
                failure_config=tune.FailureConfig(max_failures=spec.resources.trial_retries),
            ),
        )
    # Scored beside the first trials (it holds one trial worker's resources meanwhile).
    reference = start_reference(spec, tracker, teacher, cache_dir)
    # When trials could start: the overhead accounting (benchmarks/study_overhead.py)
    # counts Ray Tune's launch of the first actors from here.
    tracker.set_tags(parent, {TUNE_STARTED_TAG: f"{time.time():.3f}"})
    with tune_output(verbose):
        results = tuner.fit()
        # Tune ends fit() on a first Ctrl-C with its unfinished trials saved for a restore,
        # then stops them: by then the result grid says TERMINATED for every trial, so the
        # saved snapshot tells. Judged on this driver's own trials (the grid's): a second
        # driver of the study shares the experiment folder, and its trials are not ours.
        from binarydm.search._searcher import TRIAL_NUMBER_KEY

        own = {int(r.config[TRIAL_NUMBER_KEY]) for r in results if TRIAL_NUMBER_KEY in r.config}
        unfinished = _own_unfinished_trial_numbers(experiment_path, own)
    if unfinished:
        tracker.finish_study("KILLED")  # a resume sets it RUNNING again
        raise StudyInterrupted(unfinished)
    finish_reference(tracker, reference)
    objectives = list(zip(spec.search.metrics, spec.search.directions, strict=True))
    summary = summarize(
        tracker,
        objectives,
        reference_point=spec.search.reference_point,
        study_file_text=study_text,
    )
    tracker.finish_study("FINISHED")
    summary["location"] = location
    return summary


def _own_unfinished_trial_numbers(experiment_path: Path, own: set[int]) -> set[int]:
    """Which of ``own`` (this driver's Optuna trial numbers) its last snapshot left
    unfinished: read from the newest experiment state holding any of them, not the
    folder's newest (a second driver of the study writes its own). Newest by the start
    time in the file's name: a restored driver also rewrites its predecessor's file, whose
    stale RUNNING trials then carry the latest mtime (Ray 2.60)."""
    states = sorted(
        experiment_path.glob("experiment_state-*.json"),
        key=lambda p: (p.name, p.stat().st_mtime),
    )
    for state in reversed(states):
        statuses = _trial_statuses(state)
        if own & set(statuses):
            return {number for number in own if statuses.get(number) == "unfinished"}
    return set()


def _unfinished_trial_numbers(experiment_path: Path) -> set[int]:
    """Optuna trial numbers of the saved Tune trials that a restore will run (again)."""
    statuses = _trial_statuses(experiment_path)
    return {number for number, status in statuses.items() if status == "unfinished"}


def _trial_statuses(path: Path) -> dict[int, str]:
    """``{Optuna trial number: "done" | "unfinished"}`` of the Tune trials saved in ``path``
    (an experiment folder, read at its newest state, or one ``experiment_state-*.json``)."""
    from ray.tune import ExperimentAnalysis
    from ray.tune.experiment import Trial

    from binarydm.search._searcher import TRIAL_NUMBER_KEY

    done = (Trial.TERMINATED, Trial.ERROR)
    # Only configs and statuses are read: its warnings about metrics not yet written
    # (trials that had not reported) say nothing here.
    analysis_log = logging.getLogger(ANALYSIS_LOG)
    level = analysis_log.level
    analysis_log.setLevel(logging.ERROR)
    try:
        analysis = ExperimentAnalysis(str(path))
    finally:
        analysis_log.setLevel(level)
    return {
        int(trial.config[TRIAL_NUMBER_KEY]): "done" if trial.status in done else "unfinished"
        for trial in analysis.trials
        if TRIAL_NUMBER_KEY in trial.config
    }


def settle_orphans(
    spec: StudySpec, storage, tracker, owned: set[int], keep_unfinished: bool = False
) -> dict[int, str]:
    """Tell Optuna the end of every RUNNING trial no restored Tune trial owns.

    A killed driver leaves such trials behind when it died between Optuna's ``ask`` and
    Tune's next experiment snapshot. COMPLETE if its MLflow run finished with every
    objective, else FAIL (``fail_reason``) with its MLflow run, if any, FAILED too; with
    ``keep_unfinished`` (no Tune experiment to restore) such a trial stays RUNNING, to
    be continued by the new experiment. Returns ``{trial number: new state}``
    (``CONTINUED`` for those kept).
    """
    from optuna.trial import TrialState

    from binarydm.search._trainable import finished_metrics

    try:
        study_id = storage.get_study_id_from_name(spec.name)
    except KeyError:
        return {}
    running = storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
    orphans = [t.number for t in running if t.number not in owned]
    if not orphans:
        return {}
    runs = tracker.trial_runs()
    settled = {}
    for number in orphans:
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
        run_id = runs.get(number)
        logged = finished_metrics(tracker, run_id, spec.search.metrics) if run_id else None
        if logged is not None:
            values = [float(logged[m]) for m in spec.search.metrics]
            storage.set_trial_state_values(trial_id, TrialState.COMPLETE, values)
            settled[number] = "COMPLETE"
            continue
        if keep_unfinished:
            settled[number] = CONTINUED
            continue
        storage.set_trial_user_attr(trial_id, "fail_reason", ORPHAN_REASON)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
        if run_id and tracker.client.get_run(run_id).info.status in ("RUNNING", "SCHEDULED"):
            tracker.finish_trial(run_id, "FAILED", error=ORPHAN_REASON)
        settled[number] = "FAIL"
    log.warning("resume: settled Optuna trials left RUNNING by the killed driver: %s", settled)
    return settled


def _ended_trial_count(spec: StudySpec, storage) -> int:
    """How many of the study's Optuna trials ended (COMPLETE, PRUNED or FAIL)."""
    from optuna.trial import TrialState

    try:
        study_id = storage.get_study_id_from_name(spec.name)
    except KeyError:
        return 0
    ended = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return len(storage.get_all_trials(study_id, deepcopy=False, states=ended))


def run_single_trial(
    spec: StudySpec, address: str | None = None, say: Callable[[str], None] = log.info
) -> dict[str, Any]:
    """One trial of the study's fixed settings (``bdm-search trial``): its own MLflow run
    (``bdm.role=single-trial``), the workers' progress bars shown; returns its metrics
    with ``mlflow_run_id``. ``say`` gets the one-line notices (the teacher)."""
    import dataclasses

    from binarydm.data import cache_dir as resolve_cache_dir
    from binarydm.search._trainable import StudyContext, execute_trial
    from binarydm.tracking import StudyTracker

    quiet_library_notices()  # as a non-verbose study: Ray's token note, MLflow's table set-up
    spec = spec.resolve_paths()
    # Only the fixed settings run: the search space is not sampled.
    spec = dataclasses.replace(
        spec, search=dataclasses.replace(spec.search, seeds=spec.search.seeds[:1])
    )
    connect_ray(address)
    for note in spec.profile_notes():  # once it starts: a bad input's error stays one line
        say(note)
    tracker = StudyTracker.for_study(spec)
    run = tracker.client.create_run(
        tracker.experiment_id,
        run_name=f"{spec.name}-trial",
        tags={"study": spec.name, "bdm.role": "single-trial"},
    )
    cache = str(resolve_cache_dir(None))
    teacher = shared_teacher(spec, cache, say)
    context = StudyContext(spec, teacher, cache, "", "")
    say(f"QAT of {spec.name}'s fixed settings, then its evaluation")
    with worker_progress():  # the worker's training and sampling bars, with ETAs
        metrics = execute_trial(
            context, {}, tracker, run.info.run_id, 1, name=f"{spec.name}-single"
        )
    metrics["mlflow_run_id"] = run.info.run_id
    return metrics
