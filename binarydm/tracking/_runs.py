"""One MLflow parent run per study and one child run per trial, reused across retries and resumes.

``StudyTracker`` talks to MLflow only through an explicit ``MlflowClient``: the
Ray driver and the Ray workers share no process state, so the global
``mlflow.start_run`` stack would point each process at a different (or no) run.
Every run is found again by its tags (``study``, ``bdm.role``, ``trial_id``), so a
restored Tune trial or a resumed study logs into the run it already has. A study
also has one FP reference run (role ``reference``, see ``binarydm.search._reference``),
which is no trial: nothing that reads trials sees it.

A tracker pickles without its client (Ray ships it to workers) and contacts
MLflow only on first use, so building one never blocks on an unreachable server.
"""

from __future__ import annotations

import json
import numbers
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

from binarydm.spec import is_uri
from binarydm.tracking._queries import (
    chunks,
    oldest_run,
    quote_filter_value,
    search_all_runs,
    search_store_runs,
)

if TYPE_CHECKING:
    from binarydm.spec import StudySpec

TAG_STUDY = "study"
TAG_ROLE = "bdm.role"
TAG_TRIAL_ID = "trial_id"
TAG_ATTEMPT = "attempt"
TAG_PARETO = "pareto"
#: A trial run's searched params (as logged), comma-separated; "none" for an empty space.
TAG_SEARCHED = "searched"
TAG_ERROR = "error"
TAG_ERROR_ATTEMPT = "error_attempt"
TAG_REFERENCE_KEY = "reference_key"
TAG_REUSED_FROM = "reused_from"
TAG_REPLACED_BY = "replaced_by"
ROLE_PARENT = "parent"
ROLE_TRIAL = "trial"
#: The study's FP teacher scored with the trials' settings (``binarydm.search._reference``).
ROLE_REFERENCE = "reference"
#: A reference run a newer one replaced (its key changed, or it did not finish).
ROLE_REPLACED_REFERENCE = "reference-replaced"
REFERENCE_RUN_NAME = "fp-reference"

TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
OBJECTIVE_DIRECTIONS = ("minimize", "maximize")
TRUNCATION_MARK = "...[truncated]"
OBJECTIVES_ARTIFACT = "objectives.json"
#: MLflow 3's UI opens an experiment of this kind in its runs table (ML view), not GenAI's.
EXPERIMENT_KIND_TAGS = {"mlflow.experimentKind": "custom_model_development"}
#: MLflow 3.17's UI takes its view from this URL query, else the browser's last choice, else
#: GenAI's (runs labelled "Evaluations"): every address the platform prints or links has it.
ML_VIEW_QUERY = "workflowType=machine_learning"


def ui_page(experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI's page (after the server's address) of an experiment's runs table or
    of one run, in the ML view."""
    run = f"/runs/{run_id}" if run_id else ""
    return f"#/experiments/{experiment_id}{run}?{ML_VIEW_QUERY}"


class ParamConflictError(ValueError):
    """A param is already logged on the run with a different value (MLflow params are immutable)."""

    def __init__(self, run_id: str, conflicts: Mapping[str, tuple[str, str]]):
        self.run_id = run_id
        self.conflicts = dict(conflicts)
        shown = "; ".join(
            f"{k}: logged {truncate(old, 200)!r}, now {truncate(new, 200)!r}"
            for k, (old, new) in conflicts.items()
        )
        super().__init__(
            f"run {run_id} already has different values for {len(conflicts)} param(s): {shown}. "
            "A trial's config must not change between attempts; start a new study (or trial) "
            "for a different config."
        )

    def __reduce__(self):
        # Ray pickles exceptions across processes; the default would call __init__(message).
        return (type(self), (self.run_id, self.conflicts))


def truncate(text: str, limit: int, keep: str = "head") -> str:
    """Cut ``text`` to ``limit`` chars with a visible mark; deterministic, so re-logs match."""
    if len(text) <= limit:
        return text
    room = limit - len(TRUNCATION_MARK)
    return text[:room] + TRUNCATION_MARK if keep == "head" else TRUNCATION_MARK + text[-room:]


def _param_value(value: Any) -> str:
    # Lists and tuples as JSON so that "[1, 2]" reads back unambiguously (str() would give the
    # same for a list and a tuple, and Python reprs for nested objects).
    if isinstance(value, (list, tuple)):
        text = json.dumps(list(value), default=str)
    elif isinstance(value, Mapping):  # only empty mappings reach here: record that key exists
        text = json.dumps(dict(value), default=str)
    else:
        text = str(value)
    return truncate(text, MAX_PARAM_VAL_LENGTH)


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"weight": {"bases": 2}}`` -> ``{"weight.bases": "2"}``: values as MLflow stores them."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, f"{name}."))
        else:
            flat[name] = _param_value(value)
    return flat


def metric_value(key: str, value: Any) -> float:
    """A metric as float; 0-d tensors/arrays are accepted, NaN and inf kept (MLflow stores them)."""
    if isinstance(value, numbers.Real):
        return float(value)
    item = getattr(value, "item", None)
    if callable(item):
        try:
            scalar = item()
        except (ValueError, RuntimeError):  # more than one element
            scalar = None
        if isinstance(scalar, numbers.Real):
            return float(scalar)
    raise TypeError(f"metric {key!r} must be a real number, got {type(value).__name__}: {value!r}")


def check_terminal_status(status: str) -> None:
    if status not in TERMINAL_STATUSES:
        allowed = ", ".join(TERMINAL_STATUSES)
        raise ValueError(f"status={status!r} is invalid: allowed {allowed}")


def _now_ms() -> int:
    return int(time.time() * 1000)


class StudyTracker:
    """MLflow bookkeeping of one study: its parent run, its trial runs and their contents."""

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        study: str,
        artifact_location: str | None = None,
    ):
        quote_filter_value(study)  # fail now, not at the first search
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.study = study
        self.artifact_location = _absolute_location(artifact_location)
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None
        self._parent_run_id: str | None = None
        self._trial_run_ids: dict[int, str] = {}

    @classmethod
    def for_study(cls, spec: StudySpec) -> StudyTracker:
        """The tracker of a study whose paths are resolved (``StudySpec.resolve_paths``)."""
        tracking = spec.tracking
        if tracking.uri is None or tracking.experiment is None:
            raise ValueError(
                f"study {spec.name!r} has unresolved tracking (uri={tracking.uri!r}, "
                f"experiment={tracking.experiment!r}): call spec.resolve_paths() first"
            )
        return cls(tracking.uri, tracking.experiment, spec.name, tracking.artifact_location)

    # Ray pickles the tracker into workers: ship names and ids, rebuild the client there.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_client"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return (
            f"StudyTracker(tracking_uri={self.tracking_uri!r}, experiment={self.experiment!r}, "
            f"study={self.study!r})"
        )

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = self._find_or_create_experiment()
        return self._experiment_id

    def _find_or_create_experiment(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is None:
            try:
                return self.client.create_experiment(
                    self.experiment, self.artifact_location, tags=EXPERIMENT_KIND_TAGS
                )
            except MlflowException as exc:
                # Another process (a second driver, a worker) created it between our two calls.
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                found = self.client.get_experiment_by_name(self.experiment)
        if found.lifecycle_stage == "deleted":
            raise ValueError(
                f"MLflow experiment {self.experiment!r} (id {found.experiment_id}) is deleted; "
                f"restore it (mlflow experiments restore --experiment-id {found.experiment_id}) "
                "or choose another experiment name"
            )
        return found.experiment_id

    def _study_filter(self, role: str) -> str:
        return (
            f"tags.{TAG_STUDY} = {quote_filter_value(self.study)} AND tags.`{TAG_ROLE}` = '{role}'"
        )

    def _find_or_create_run(
        self, filter_string: str, tags: dict[str, str], run_name: str, status: str
    ) -> str:
        existing = search_all_runs(self.client, self.experiment_id, filter_string)
        if existing:
            return oldest_run(existing).info.run_id
        created = self.client.create_run(self.experiment_id, tags=tags, run_name=run_name)
        # MLflow has no unique constraint on tags: two processes may both miss and both create.
        # Both re-read and agree on the oldest; the loser deletes its own run.
        winner = oldest_run(search_all_runs(self.client, self.experiment_id, filter_string))
        if winner.info.run_id != created.info.run_id:
            self.client.delete_run(created.info.run_id)
        elif status != "RUNNING":  # create_run always starts RUNNING
            self.client.update_run(created.info.run_id, status=status)
        return winner.info.run_id

    def parent_run_id(self) -> str:
        """The study's one parent run, found by tags or created on the first call."""
        if self._parent_run_id is None:
            tags = {TAG_STUDY: self.study, TAG_ROLE: ROLE_PARENT}
            self._parent_run_id = self._find_or_create_run(
                self._study_filter(ROLE_PARENT), tags, run_name=self.study, status="RUNNING"
            )
        return self._parent_run_id

    def trial_run_id(self, trial_id: int) -> str:
        """The one child run of ``trial_id`` (the Optuna trial number), reused by every attempt."""
        if isinstance(trial_id, bool) or not isinstance(trial_id, int) or trial_id < 0:
            raise ValueError(
                f"trial_id={trial_id!r} is invalid: expected an Optuna trial number >= 0"
            )
        if trial_id not in self._trial_run_ids:
            parent = self.parent_run_id()
            tags = {
                TAG_STUDY: self.study,
                TAG_ROLE: ROLE_TRIAL,
                TAG_TRIAL_ID: str(trial_id),
                MLFLOW_PARENT_RUN_ID: parent,
            }
            query = f"{self._study_filter(ROLE_TRIAL)} AND tags.{TAG_TRIAL_ID} = '{trial_id}'"
            # SCHEDULED until an attempt starts: a run created ahead of its trial is not running.
            run_id = self._find_or_create_run(
                query, tags, run_name=f"trial-{trial_id:04d}", status="SCHEDULED"
            )
            self._trial_run_ids[trial_id] = run_id
        return self._trial_run_ids[trial_id]

    def trial_runs(self) -> dict[int, str]:
        """``trial_id -> run_id`` of every trial run of this study already in MLflow."""
        runs = search_all_runs(self.client, self.experiment_id, self._study_filter(ROLE_TRIAL))
        by_trial: dict[int, list[Run]] = {}
        for run in runs:
            by_trial.setdefault(int(run.data.tags[TAG_TRIAL_ID]), []).append(run)
        return {trial: oldest_run(found).info.run_id for trial, found in sorted(by_trial.items())}

    def reference_runs(self) -> list[Run]:
        """This study's active FP reference runs (one, or none before the first study run)."""
        return search_all_runs(self.client, self.experiment_id, self._study_filter(ROLE_REFERENCE))

    def create_reference_run(self, key: str) -> str:
        """A new RUNNING reference run of this study for ``key`` under the parent run."""
        tags = {
            TAG_STUDY: self.study,
            TAG_ROLE: ROLE_REFERENCE,
            TAG_REFERENCE_KEY: key,
            MLFLOW_PARENT_RUN_ID: self.parent_run_id(),
        }
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=REFERENCE_RUN_NAME)
        return run.info.run_id

    def replace_reference_run(self, run_id: str, replaced_by: str | None) -> None:
        """Take an old reference run out of the study (role ``reference-replaced``), kept."""
        tags = {TAG_ROLE: ROLE_REPLACED_REFERENCE, TAG_REPLACED_BY: replaced_by or "none"}
        self.set_tags(run_id, tags)
        if self.client.get_run(run_id).info.status in ("RUNNING", "SCHEDULED"):
            self.client.set_terminated(run_id, status="KILLED")

    def finished_reference_runs(self, key: str) -> list[Run]:
        """FINISHED reference runs of ``key`` in any experiment of this store, oldest first."""
        query = (
            f"tags.`{TAG_ROLE}` = '{ROLE_REFERENCE}' AND tags.{TAG_REFERENCE_KEY} = "
            f"{quote_filter_value(key)} AND attributes.status = 'FINISHED'"
        )
        found = search_store_runs(self.client, query)
        return sorted(found, key=lambda run: (run.info.start_time or 0, run.info.run_id))

    def start_attempt(self, trial_id: int) -> tuple[str, int]:
        """Count one more start of ``trial_id`` (tag ``attempt``) and mark its run RUNNING."""
        run_id = self.trial_run_id(trial_id)
        previous = self.client.get_run(run_id).data.tags.get(TAG_ATTEMPT, "0")
        attempt = int(previous) + 1
        self.client.set_tag(run_id, TAG_ATTEMPT, str(attempt))
        self.client.update_run(run_id, status="RUNNING")
        return run_id, attempt

    def finish_trial(self, run_id: str, status: str, error: str | None = None) -> None:
        """End an attempt; ``error`` (a traceback, say) goes to tag ``error``, tail kept."""
        check_terminal_status(status)
        if error:
            # The error belongs to this attempt; a later successful attempt leaves it in place,
            # so record which attempt it came from.
            attempt = self.client.get_run(run_id).data.tags.get(TAG_ATTEMPT, "0")
            tags = [
                RunTag(TAG_ERROR, truncate(error, MAX_TAG_VAL_LENGTH, keep="tail")),
                RunTag(TAG_ERROR_ATTEMPT, attempt),
            ]
            self.client.log_batch(run_id, tags=tags)
        self.client.set_terminated(run_id, status=status)

    def finish_study(self, status: str = "FINISHED") -> None:
        """End the parent run; resuming the study later reuses it (``set_running`` reopens it)."""
        check_terminal_status(status)
        self.client.set_terminated(self.parent_run_id(), status=status)

    def set_running(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        entries = [RunTag(k, truncate(str(v), MAX_TAG_VAL_LENGTH)) for k, v in tags.items()]
        for chunk in chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, tags=chunk)

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> dict[str, str]:
        """Log flattened, stringified params; those already logged with equal values are skipped.

        Returns the params newly written. Raises ``ParamConflictError`` when a key is already
        logged with another value, before writing anything.
        """
        flat = flatten_params(params)
        logged = self.client.get_run(run_id).data.params
        conflicts = {k: (logged[k], v) for k, v in flat.items() if k in logged and logged[k] != v}
        if conflicts:
            raise ParamConflictError(run_id, conflicts)
        fresh = {k: v for k, v in flat.items() if k not in logged}
        entries = [Param(k, v) for k, v in fresh.items()]
        for chunk in chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, params=chunk)
        return fresh

    def log_metrics(
        self,
        run_id: str,
        metrics: Mapping[str, Any],
        step: int | None = None,
        timestamp_ms: int | None = None,
    ) -> None:
        """Log numeric metrics at ``step`` (0 when None, as MLflow does); None values are skipped.

        An explicit ``timestamp_ms`` makes a re-send identical, which SQL stores deduplicate.
        """
        stamp = _now_ms() if timestamp_ms is None else int(timestamp_ms)
        entries = [
            Metric(key, metric_value(key, value), stamp, int(step or 0))
            for key, value in metrics.items()
            if value is not None
        ]
        self.log_metric_entities(run_id, entries)

    def log_training_curve(self, run_id: str, rows: Sequence[Mapping[str, Any]]) -> int:
        """Log rows like ``{"step": 100, "loss": 0.2, "loss_lrm": 0.01}``; returns the metric count.

        A row may carry ``timestamp_ms``; rows without it get the time of this call.
        """
        now = _now_ms()
        entries = []
        for row in rows:
            if "step" not in row:
                raise ValueError(f"training-curve row {dict(row)!r} has no 'step'")
            step = int(row["step"])
            stamp = int(row.get("timestamp_ms", now))
            for key, value in row.items():
                if key in ("step", "timestamp_ms") or value is None:
                    continue
                entries.append(Metric(key, metric_value(key, value), stamp, step))
        self.log_metric_entities(run_id, entries)
        return len(entries)

    def log_metric_entities(self, run_id: str, metrics: Sequence[Metric]) -> None:
        for chunk in chunks(list(metrics), MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=chunk)

    def log_artifact_json(self, run_id: str, name: str, obj: Any) -> str:
        """Write ``obj`` as indented JSON artifact ``name`` (``.json`` appended if missing)."""
        if not name.endswith(".json"):
            name = f"{name}.json"
        # default=str: resolved configs hold Paths and enums that json cannot encode itself.
        text = json.dumps(obj, indent=2, sort_keys=True, default=str, allow_nan=True)
        self.client.log_text(run_id, text, name)
        return name

    def log_artifact_file(self, run_id: str, path: str | Path, artifact_path: str | None = None):
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self.client.log_text(run_id, text, name)

    def log_figure(self, run_id: str, figure: Any, name: str) -> None:
        """A matplotlib figure as an image artifact (format from ``name``'s suffix)."""
        self.client.log_figure(run_id, figure, name)

    def mark_pareto(self, trial_run_ids: Mapping[int, str], pareto_ids: Iterable[int]) -> None:
        """Tag every trial run ``pareto=true`` or ``false``."""
        pareto = set(pareto_ids)
        unknown = sorted(pareto - set(trial_run_ids))
        if unknown:
            raise ValueError(f"Pareto trial ids {unknown} have no run in trial_run_ids")
        for trial_id, run_id in trial_run_ids.items():
            self.client.set_tag(run_id, TAG_PARETO, "true" if trial_id in pareto else "false")

    def log_study_summary(
        self,
        objectives: Sequence[tuple[str, str]],
        reference_point: Mapping[str, float],
        hypervolume: float,
        counts_by_state: Mapping[str, int],
        study_file_text: str,
        study_file_name: str = "study.yaml",
    ) -> str:
        """Put what ``bdm-search pareto`` needs on the parent run; returns the parent run id.

        Objectives and the reference point are tags and ``objectives.json`` (not params: a
        resumed study re-logs them). ``hypervolume`` and ``trials_<state>`` are metrics whose
        step is the number of trials, so each re-summary of a resumed study adds a point.
        """
        objectives = [(str(metric), str(direction)) for metric, direction in objectives]
        for metric, direction in objectives:
            if direction not in OBJECTIVE_DIRECTIONS:
                raise ValueError(
                    f"objective {metric!r} direction={direction!r} is invalid: "
                    f"allowed {', '.join(OBJECTIVE_DIRECTIONS)}"
                )
        parent = self.parent_run_id()
        total = int(sum(counts_by_state.values()))
        tags = {"objectives": ",".join(f"{m}:{d}" for m, d in objectives)}
        tags.update({f"reference_point.{m}": repr(float(v)) for m, v in reference_point.items()})
        self.set_tags(parent, tags)
        metrics = {"hypervolume": hypervolume, "trials_total": total}
        metrics.update({f"trials_{state.lower()}": n for state, n in counts_by_state.items()})
        self.log_metrics(parent, metrics, step=total)
        summary = {
            "objectives": [{"metric": m, "direction": d} for m, d in objectives],
            "reference_point": {m: float(v) for m, v in reference_point.items()},
            "hypervolume": float(hypervolume),
            "counts_by_state": dict(counts_by_state),
        }
        self.log_artifact_json(parent, OBJECTIVES_ARTIFACT, summary)
        self.client.log_text(parent, study_file_text, study_file_name)
        return parent

    def log_pareto_plots(
        self,
        points: Sequence[Mapping[str, Any]],
        objectives: Sequence[tuple[str, str]],
        fp: Mapping[str, Any] | None = None,
    ) -> None:
        """``pareto.png`` and ``pareto.html`` on the parent run (see ``plots.pareto_plots``);
        ``fp``: the FP reference's metrics, drawn as its own point."""
        from binarydm.tracking._plots import log_pareto_plots  # matplotlib only when used

        log_pareto_plots(self, self.parent_run_id(), points, objectives, fp=fp)


def _absolute_location(location: str | None) -> str | None:
    # Tune runs each trial in its own working directory: a relative artifact root would land
    # somewhere different per process, so pin plain paths here (URIs pass through).
    if location is None or is_uri(location):
        return location
    return str(Path(location).expanduser().resolve())
