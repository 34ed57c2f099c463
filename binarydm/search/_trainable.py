"""The Ray Tune function trainable of a study: one Optuna trial = one MLflow run.

For each seed of the study it fits one Ray Train QAT run (Train V2 pattern:
build and fit a ``TorchTrainer`` inside the trainable, results forwarded to Tune
by ``TuneReportCallback``; with ``workers.inline`` the one worker runs right here),
then reports the mean over seeds (and the spread) as
the trial's objectives. The MLflow run is found by the Optuna trial number, so
retries and restored studies reuse it; ``attempt`` counts the starts. A restored
trial whose run already FINISHED reports the logged metrics instead of training
again. An attempt that raises leaves its error on the Optuna trial (Tune may retry
it, ``resources.trial_retries``); a non-finite loss is reported, not raised, so it
is never retried.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
import traceback
from pathlib import Path
from typing import Any

from binarydm.metric_contract import (
    AVERAGED,
    COMPARABILITY,
    logged_param_name,
    once_under_comparability_names,
    seed_prefix,
    timing,
)
from binarydm.search._launch import launch_metrics
from binarydm.search._searcher import TRIAL_NUMBER_KEY
from binarydm.tracking import MLFLOW_RUN_ATTR
from binarydm.train.settings import TrialSettings


@dataclasses.dataclass(frozen=True)
class StudyContext:
    """What every trial of a study needs from the driver (picklable, absolute paths)."""

    spec: Any  # StudySpec with resolved paths
    teacher_dir: str | None
    cache_dir: str
    parent_run_id: str
    study_file_text: str
    # Optuna trial number (or "*") -> FaultPlan fields; tests only (driver.FAULTS_ENV).
    faults: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def faults_of(self, number: int) -> dict[str, Any]:
        return {**self.faults.get("*", {}), **self.faults.get(str(number), {})}


def aggregate(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of each averaged metric over seeds, plus ``<metric>_std`` when there are several."""
    out: dict[str, Any] = {}
    for key in AVERAGED:
        values = [float(m[key]) for m in per_seed if isinstance(m.get(key), int | float)]
        if not values:
            continue
        out[key] = statistics.fmean(values)
        if len(values) > 1:
            out[f"{key}_std"] = statistics.stdev(values)
    for key in COMPARABILITY:
        if key in per_seed[0]:
            out[key] = per_seed[0][key]
    return out


def trial_params(
    context: StudyContext, params: dict[str, Any], settings: TrialSettings | None = None
) -> dict[str, Any]:
    """The run's params: flattened resolved settings, seeds, profile and sampled values.

    ``settings``: the trial's, at its first seed (built from ``params`` when None).
    """
    spec = context.spec
    if settings is None:
        settings = spec.trial_settings(params, spec.search.seeds[0])
    flat = settings.flat()
    flat.pop("seed")
    # A cases dimension's label (``row: ebb``) is no settings key: logged beside them.
    labels = {key: params[key] for key in params if key not in flat}
    flat = once_under_comparability_names(flat)
    if flat.get("teacher.pretrained"):
        # A given teacher is loaded, not pretrained here: logging the pretraining fields
        # would claim settings that shaped no weights (teacher.sha256 says which were used).
        flat = {
            key: value
            for key, value in flat.items()
            if not key.startswith("teacher.") or key == "teacher.pretrained"
        }
    from binarydm.train import fid_reference_name

    return {
        **flat,
        **labels,
        "fid_reference": fid_reference_name(settings),
        "seeds": list(spec.search.seeds),
        "seed": spec.search.seeds[0] if len(spec.search.seeds) == 1 else "per-seed",
        "profile": spec.profile or "none",
        "study": spec.name,
    }


def run_trial(config: dict[str, Any], context: StudyContext) -> None:
    """Tune entry point (wrapped with ``tune.with_parameters(context=...)``)."""
    entered = time.time()
    import ray.tune

    from binarydm.tracking import StudyTracker
    from binarydm.train import DivergedTrialError
    from binarydm.train.job import FaultPlan

    config = dict(config)
    number = int(config.pop(TRIAL_NUMBER_KEY))
    spec = context.spec
    tracker = StudyTracker.for_study(spec)
    logged = finished_metrics(tracker, tracker.trial_run_id(number), spec.search.metrics)
    if logged is not None:
        # The study's driver died after this trial ended but before Tune recorded it: report
        # what the run logged instead of training (and counting an attempt) again.
        ray.tune.report({**logged, "trial_id": number, "final": True})
        return
    run_id, attempt = tracker.start_attempt(number)
    set_trial_user_attrs(spec, number, {MLFLOW_RUN_ATTR: run_id})
    # Measured now, logged once the attempt ends: the MLflow UI lists a run's metrics in the
    # order they were first logged (its run page, the compare view's default axis), so the
    # launch stamps go after the training curve and the objectives.
    launch = launch_metrics(entered)
    # The trial's settings, built once: every seed's are these with its seed.
    settings = spec.trial_settings(config, spec.search.seeds[0])
    try:
        metrics = execute_trial(
            context, config, tracker, run_id, attempt,
            name=f"{spec.name}-trial{number:04d}", extra_callbacks=[_tune_forwarder(settings)],
            faults=FaultPlan.from_mapping(context.faults_of(number)), settings=settings,
        )  # fmt: skip
    except DivergedTrialError as exc:
        tracker.log_metrics(run_id, launch)
        # Deterministic: a retry would diverge again. Reported, not raised, so Tune does not
        # retry it and the searcher records the reason.
        ray.tune.report({"error": str(exc), "trial_id": number, "final": True})
        return
    except Exception as exc:
        record_attempt_error(spec, number, attempt, exc)
        with contextlib.suppress(Exception):  # the attempt's own error is the one to raise
            tracker.log_metrics(run_id, launch)
        raise
    tracker.log_metrics(run_id, launch)
    ray.tune.report({**metrics, "trial_id": number, "final": True})


def _tune_forwarder(settings: TrialSettings):
    """The Ray Train callback that forwards the fit's reports to this Tune trial."""
    if settings.workers.inline:
        from binarydm.search._callbacks import InlineTuneReport

        return InlineTuneReport()
    from ray.tune.integration.ray_train import TuneReportCallback

    return TuneReportCallback()


def finished_metrics(tracker, run_id: str, objectives: list[str]) -> dict[str, Any] | None:
    """The seed-averaged metrics a FINISHED run logged, or None if it is not finished."""
    run = tracker.client.get_run(run_id)
    if run.info.status != "FINISHED":
        return None
    metrics = {k: v for k, v in run.data.metrics.items() if k in AVERAGED or k.endswith("_std")}
    return metrics if all(m in metrics for m in objectives) else None


def record_attempt_error(spec, number: int, attempt: int, exc: BaseException) -> None:
    """Put this attempt's error on the Optuna trial (user attrs ``last_error*``).

    Ray Tune tells its searcher only that a trial errored, not why; the searcher turns this
    attr into the FAILED trial's ``fail_reason``.
    """
    set_trial_user_attrs(
        spec, number, {"last_error": error_line(exc), "last_error_attempt": attempt}
    )


def set_trial_user_attrs(spec, number: int, attrs: dict[str, Any]) -> None:
    """Set user attrs of the study's Optuna trial ``number`` (none for a single-trial run)."""
    import optuna

    storage = optuna.storages.RDBStorage(spec.storage.optuna)
    try:
        study_id = storage.get_study_id_from_name(spec.name)
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
        for key, value in attrs.items():
            storage.set_trial_user_attr(trial_id, key, value)
    except (KeyError, RuntimeError, optuna.exceptions.OptunaError):
        pass  # no such trial (a single-trial run) or already finished: MLflow has the rest
    finally:
        storage.remove_session()


def log_environment(tracker, run_id: str, environment: dict[str, str], attempt: int) -> None:
    """Log the reproducibility params (code commit, versions, hardware) of this attempt.

    The config of a trial must not change between attempts, but its environment may: a
    retry lands on another node, a study is resumed after a ``git pull``. Values that
    differ from the first attempt's params go to tags ``attempt<N>.<key>`` instead of
    failing the trial on MLflow's immutable params.
    """
    logged = tracker.client.get_run(run_id).data.params
    changed = {k: v for k, v in environment.items() if k in logged and logged[k] != str(v)}
    tracker.log_params(run_id, {k: v for k, v in environment.items() if k not in changed})
    if changed:
        tracker.set_tags(run_id, {f"attempt{attempt}.{k}": v for k, v in changed.items()})


def error_line(exc: BaseException) -> str:
    """``Type: message`` of the error a worker raised, first line only.

    Ray Train wraps a worker's exception in ``WorkerGroupError.worker_failures``, and Ray
    wraps a remote exception in ``RayTaskError`` (its ``cause``); unwrap both.
    """
    failures = getattr(exc, "worker_failures", None)
    if failures:
        exc = failures[min(failures)]
    exc = getattr(exc, "controller_failure", exc)
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    message = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {message[0] if message else ''}"


def execute_trial(
    context: StudyContext,
    config: dict[str, Any],
    tracker,
    run_id: str,
    attempt: int,
    *,
    name: str,
    extra_callbacks: list | None = None,
    faults=None,
    settings: TrialSettings | None = None,
) -> dict[str, Any]:
    """Fit every seed of one configuration, log the run, return the seed-averaged metrics.

    ``settings``: the trial's at its first seed (built from ``config`` when None); each
    seed's are these with its seed. ``faults``: a ``binarydm.train.job.FaultPlan``
    (tests). The MLflow run ends FINISHED, or FAILED with the traceback before the error
    propagates.
    """
    from binarydm.models import weights_sha256
    from binarydm.search._callbacks import MlflowCurveCallback, curve_buffer
    from binarydm.tracking import TAG_SEARCHED, reproducibility_params
    from binarydm.train import RungPlan, dataset_sha256, ensure_teacher, final_metrics, fit_qat

    spec = context.spec
    entered = time.perf_counter()
    try:
        tracker.set_tags(
            run_id,
            # Which of the ~70 params the search chose (the rest are the study's settings).
            {"profile": spec.profile or "none", "attempt": attempt,
             TAG_SEARCHED: ",".join(sorted(map(logged_param_name, spec.search.space))) or "none"},
        )  # fmt: skip
        settings0 = settings or spec.trial_settings(config, spec.search.seeds[0])
        data_root = settings0.data.root
        params = trial_params(context, config, settings0)
        params["data.sha256"] = dataset_sha256(settings0, data_root, context.cache_dir)
        tracker.log_params(run_id, params)
        log_environment(tracker, run_id, reproducibility_params(), attempt)
        tracker.log_artifact_json(
            run_id, "config.json", {"params": config, **settings0.to_versioned_dict()}
        )
        per_seed, checkpoints = [], []
        storage = str(Path(spec.storage.ray_results) / "trials")
        # One teacher for every seed: its cache key holds teacher.seed, not the QAT seed.
        teacher = context.teacher_dir or ensure_teacher(
            settings0, storage_path=storage, data_root=data_root, cache_dir=context.cache_dir
        )
        tracker.log_params(run_id, {"teacher.sha256": weights_sha256(teacher)})
        prepare_s = None
        early = spec.search.early_stopping
        rungs = RungPlan()
        if early.enabled:
            rungs = RungPlan(
                steps=early.rung_steps(settings0.training.steps),
                # Checked against this trial's fid_dims (the space may sample it) now, at
                # its start, not at its first rung.
                fid_samples=early.proxy_fid_samples(settings0.evaluation.fid_dims),
                fid_sampling_steps=early.sampling_steps,
            )
        for seed in spec.search.seeds:
            seed_settings = settings0 if seed == settings0.seed else settings0.replace(seed=seed)
            prefix = seed_prefix(seed) if len(spec.search.seeds) > 1 else ""
            fit_start, fit_start_unix = time.perf_counter(), time.time()
            if prepare_s is None:
                prepare_s = fit_start - entered
            result = fit_qat(
                seed_settings,
                name=f"{name}-seed{seed}",
                storage_path=storage,
                teacher_dir=teacher,
                data_root=data_root,
                cache_dir=context.cache_dir,
                callbacks=[*(extra_callbacks or []), MlflowCurveCallback(tracker, run_id, prefix)],
                faults=faults,
                # Rungs are the first seed's steps: the trial is judged on its first seed.
                rungs=rungs if seed == spec.search.seeds[0] else RungPlan(),
            )
            fit_s, fit_end_unix = time.perf_counter() - fit_start, time.time()
            # The Train controller has finished: replay any curve points an outage held back.
            curve_buffer(tracker, run_id, prefix).flush()
            # The fit's wall time around the workers' own setup_s + train_s + eval_s is Ray
            # Train's: controller and worker start-up, checkpoint persistence, shutdown.
            seed_metrics = final_metrics(result)
            per_seed.append(
                {
                    **seed_metrics,
                    timing("fit_s"): fit_s,
                    # Fit start to the worker's first line; its final report to fit's return.
                    timing("ray_start_s"): seed_metrics["worker_entered_unix"] - fit_start_unix,
                    timing("ray_stop_s"): fit_end_unix - seed_metrics["final_report_unix"],
                }
            )
            checkpoints.append(result.checkpoint.path)
        metrics = aggregate(per_seed)
        # Trial start to its first fit: params and data hash logged, the teacher found.
        metrics[timing("prepare_s")] = prepare_s
        # Comparability settings of the FID are params (strings included), the rest metrics.
        tracker.log_params(run_id, {k: metrics[k] for k in COMPARABILITY if k in metrics})
        numeric = {k: v for k, v in metrics.items() if k not in COMPARABILITY}
        tracker.log_metrics(run_id, numeric, step=settings0.training.steps)
        tracker.log_artifact_file(run_id, Path(checkpoints[0]) / "samples.png")
        tracker.set_tags(run_id, {"checkpoint": checkpoints[0]})
        tracker.finish_trial(run_id, "FINISHED")
    except SystemExit:
        # Ray Tune stopping the trial (a report raises it: early stopping, the study's
        # end): the driver records the run (``PrunedRunRecorder``), not as a failure.
        raise
    except BaseException as exc:
        tracker.finish_trial(run_id, "FAILED", error="".join(traceback.format_exception(exc)))
        raise
    return metrics
