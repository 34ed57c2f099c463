"""Read a finished (or running) study back from MLflow alone, without creating anything.

``bdm-search pareto EXPERIMENT`` recomputes the Pareto front, the hypervolume and
the plots from these records, so nothing here may depend on Ray or Optuna state.
Trials (``load_study_results``) and the study's FP reference run (``load_reference``)
are read apart: the reference is never a trial.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from binarydm.tracking._queries import (
    oldest_run,
    quote_filter_value,
    search_all_runs,
    search_store_runs,
)
from binarydm.tracking._runs import (
    OBJECTIVES_ARTIFACT,
    ROLE_PARENT,
    ROLE_REFERENCE,
    ROLE_TRIAL,
    TAG_ATTEMPT,
    TAG_PARETO,
    TAG_REFERENCE_KEY,
    TAG_REUSED_FROM,
    TAG_ROLE,
    TAG_SEARCHED,
    TAG_STUDY,
    TAG_TRIAL_ID,
)


def _experiment_id(client: MlflowClient, experiment: str) -> str:
    found = client.get_experiment_by_name(experiment)
    if found is None or found.lifecycle_stage == "deleted":
        raise LookupError(
            f"no active MLflow experiment named {experiment!r} at {client.tracking_uri}; "
            "check the name and the store (--tracking-uri)"
        )
    return found.experiment_id


#: A prefix of digits alone shorter than this is taken for a trial number and refused.
MIN_DIGIT_PREFIX = 6


def find_run(client: MlflowClient, reference: str) -> Run:
    """A run of the store by its id, a unique prefix of it (the Pareto table prints 12
    characters), or ``STUDY:N``, the trial of Optuna number N in study STUDY.

    Raises LookupError naming the candidates when a prefix is ambiguous or matches none,
    and for a short number (``5``: meant ``STUDY:5``, not the run whose id starts with 5).
    """
    study, sep, number = reference.rpartition(":")
    if sep and study and number.isdigit():
        query = (
            f"tags.{TAG_STUDY} = {quote_filter_value(study)} AND tags.`{TAG_ROLE}` = "
            f"'{ROLE_TRIAL}' AND tags.{TAG_TRIAL_ID} = '{int(number)}'"
        )
        found = search_store_runs(client, query)
        if not found:
            raise LookupError(
                f"study {study!r} has no trial {int(number)} at {client.tracking_uri}"
            )
        return oldest_run(found)
    if reference.isdigit() and len(reference) < MIN_DIGIT_PREFIX:
        # "5" matched run 52ea... and sampled the wrong model: a short number is a trial.
        raise LookupError(
            f"{reference!r} looks like a trial number: pass STUDY:{reference} (the trial of "
            f"that Optuna number, e.g. lrm_rank:{reference}), or at least {MIN_DIGIT_PREFIX} "
            "characters of a run id (the Pareto table prints 12)"
        )
    if len(reference) == 32:
        try:
            return client.get_run(reference)
        except MlflowException:
            pass
    found = [r for r in search_store_runs(client, "") if r.info.run_id.startswith(reference)]
    if len(found) == 1:
        return found[0]
    if not found or not reference:
        raise LookupError(
            f"run {reference!r} not found at {client.tracking_uri}; pass a run id, a unique "
            "prefix of one (as the Pareto table prints) or STUDY:TRIAL_NUMBER"
        )
    names = ", ".join(f"{r.info.run_id} ({r.info.run_name})" for r in found[:10])
    raise LookupError(f"run {reference!r} is ambiguous: {len(found)} runs start with it: {names}")


def _parent_run(client: MlflowClient, experiment_id: str, experiment: str, study: str) -> Run:
    query = (
        f"tags.{TAG_STUDY} = {quote_filter_value(study)} AND tags.`{TAG_ROLE}` = '{ROLE_PARENT}'"
    )
    parents = search_all_runs(client, experiment_id, query)
    if not parents:
        known = ", ".join(list_studies(experiment, client.tracking_uri)) or "none"
        raise LookupError(
            f"experiment {experiment!r} has no study {study!r}; studies there: {known}"
        )
    return oldest_run(parents)


def list_studies(experiment: str, tracking_uri: str | None = None) -> list[str]:
    """Names of the studies (parent runs) in ``experiment``, sorted."""
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = _experiment_id(client, experiment)
    parents = search_all_runs(client, experiment_id, f"tags.`{TAG_ROLE}` = '{ROLE_PARENT}'")
    return sorted({run.data.tags[TAG_STUDY] for run in parents})


def _trial_record(run: Run) -> dict[str, Any]:
    tags = run.data.tags
    pareto = tags.get(TAG_PARETO)
    return {
        "trial_id": int(tags[TAG_TRIAL_ID]),
        "run_id": run.info.run_id,
        "status": run.info.status,
        "attempt": int(tags.get(TAG_ATTEMPT, "0")),
        "pareto": None if pareto is None else pareto == "true",
        "params": dict(run.data.params),
        "metrics": dict(run.data.metrics),
        "tags": dict(tags),
        # The searched params the run logged (its ``searched`` tag), in tag order.
        "searched": [p for p in tags.get(TAG_SEARCHED, "").split(",") if p in run.data.params],
        "start_time": run.info.start_time,
        "end_time": run.info.end_time,
    }


def _child_runs(tracking_uri: str | None, experiment: str, study: str, role: str) -> list[Run]:
    """Every run of ``role`` (trial or reference) under the parent run of ``study``."""
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = _experiment_id(client, experiment)
    parent = _parent_run(client, experiment_id, experiment, study)
    query = (
        f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.info.run_id}' AND tags.`{TAG_ROLE}` = '{role}'"
    )
    return search_all_runs(client, experiment_id, query)


def load_study_results(
    experiment: str, study: str, tracking_uri: str | None = None
) -> list[dict[str, Any]]:
    """One record per trial of ``study``, sorted by ``trial_id``.

    Keys: ``trial_id``, ``run_id``, ``status``, ``attempt``, ``pareto`` (None before the
    study tagged it), ``params``, ``metrics`` (latest value of each), ``tags``,
    ``start_time``, ``end_time``. ``tracking_uri`` None means MLflow's default
    (``MLFLOW_TRACKING_URI``).
    """
    by_trial: dict[int, list[Run]] = {}
    for run in _child_runs(tracking_uri, experiment, study, ROLE_TRIAL):
        by_trial.setdefault(int(run.data.tags[TAG_TRIAL_ID]), []).append(run)
    return [_trial_record(oldest_run(runs)) for _, runs in sorted(by_trial.items())]


def load_reference(
    experiment: str, study: str, tracking_uri: str | None = None
) -> dict[str, Any] | None:
    """The FP reference run of ``study`` (any status), or None if it has none.

    Keys: ``run_id``, ``status``, ``reference_key``, ``reused_from`` (the run its values
    were copied from, or None), ``params``, ``metrics``, ``tags``, ``start_time``,
    ``end_time``. Not a trial: ``load_study_results`` never returns it.
    """
    runs = _child_runs(tracking_uri, experiment, study, ROLE_REFERENCE)
    if not runs:
        return None
    run = oldest_run(runs)
    tags = run.data.tags
    return {
        "run_id": run.info.run_id,
        "status": run.info.status,
        "reference_key": tags.get(TAG_REFERENCE_KEY),
        "reused_from": tags.get(TAG_REUSED_FROM),
        "params": dict(run.data.params),
        "metrics": dict(run.data.metrics),
        "tags": dict(tags),
        "start_time": run.info.start_time,
        "end_time": run.info.end_time,
    }


def plot_points(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``load_study_results`` records in the shape ``plots.pareto_plots`` takes."""
    return [
        {
            **record["metrics"],
            "trial_id": record["trial_id"],
            "pareto": bool(record["pareto"]),
            "params": record["params"],
            "searched": record.get("searched", []),
        }
        for record in records
    ]


def load_study_summary(
    experiment: str, study: str, tracking_uri: str | None = None
) -> dict[str, Any]:
    """The parent run's summary: ``objectives.json`` content plus ``run_id``, tags and metrics.

    ``objectives``/``reference_point``/... are absent when the study has not been
    summarised yet (``log_study_summary`` not called).
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = _experiment_id(client, experiment)
    parent = _parent_run(client, experiment_id, experiment, study)
    summary: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(parent.info.run_id, OBJECTIVES_ARTIFACT, tmp)
            summary = json.loads(Path(path).read_text())
    except (MlflowException, OSError):  # not summarised yet
        summary = {}
    summary.update(
        run_id=parent.info.run_id,
        status=parent.info.status,
        tags=dict(parent.data.tags),
        metrics=dict(parent.data.metrics),
    )
    return summary
