"""OptunaSearch with the study semantics BinaryDM needs.

Out of the box ``OptunaSearch`` tells Optuna COMPLETE for an errored trial that
had reported metrics, and leaves a trial RUNNING forever when an objective is
missing. Here a trial is COMPLETE only with every objective finite; otherwise it
is FAILED with the reason in its user attrs (for a trial that raised, with the error
the trainable left in ``last_error``: Tune tells the searcher only that it errored).
A trial the early-stopping scheduler stopped at a rung (``_early_stop.was_pruned``) is
PRUNED, its rung's proxy, costs, index and step in its user attrs: Optuna takes
``tell(state=PRUNED)`` in multi-objective studies, and PRUNED trials are in no front.
The Optuna trial number is passed to the trainable (``TRIAL_NUMBER_KEY``): it is
the stable ``trial_id`` of MLflow runs. The Optuna study names its objectives after
the metrics (``optuna-dashboard`` shows ``fid``, not ``0``), and each trial carries its
MLflow run id in the user attr ``mlflow_run_id`` (set by the trainable). A resume that
has no Tune experiment to restore (one recreated from a run archive) hands the trials a
lost driver left RUNNING to its first Tune trials (``continued``): each goes on under its
own Optuna trial and MLflow run, as a restored Tune trial would.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

from ray.tune.search.optuna import OptunaSearch

from binarydm.search._early_stop import PRUNED_STATE, rung_values, was_pruned
from binarydm.spec import cost_objectives

TRIAL_NUMBER_KEY = "__optuna_trial_number"
log = logging.getLogger(__name__)


def failure_reason(result: dict[str, Any] | None, metrics: list[str], error: bool) -> str | None:
    """Why a finished Tune trial must count as FAILED in Optuna, or None if it succeeded."""
    if error:
        detail = (result or {}).get("error")
        return f"trial raised an error{': ' + str(detail) if detail else ''}"
    if not result:
        return "trial reported no result"
    if result.get("error"):
        return str(result["error"])
    for metric in metrics:
        value = result.get(metric)
        if value is None:
            return f"objective {metric!r} missing from the final result"
        if not isinstance(value, int | float) or not math.isfinite(value):
            return f"objective {metric!r} is not finite: {value!r}"
    return None


class BinaryDMOptunaSearch(OptunaSearch):
    """OptunaSearch that records failures as FAILED and exposes the Optuna trial number."""

    def __init__(self, *args: Any, continued: tuple[int, ...] = (), **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._continued = list(continued)

    def _setup_study(self, mode) -> None:
        super()._setup_study(mode)
        self._name_objectives()

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        self._name_objectives()

    def _name_objectives(self) -> None:
        """Name the study's objectives after their metrics (stored with the study)."""
        if self._ot_study is None:
            return
        names = self.metric if isinstance(self.metric, list) else [self.metric]
        if self._ot_study.metric_names == names:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ExperimentalWarning: the API, not the study
            self._ot_study.set_metric_names(names)

    def suggest(self, trial_id: str) -> dict | None:
        if trial_id not in self._ot_trials:
            continued = self._next_continued()
            if continued is not None:
                self._ot_trials[trial_id] = continued
        params = super().suggest(trial_id)
        if params is None:
            return None
        ot_trial = self._ot_trials[trial_id]
        params[TRIAL_NUMBER_KEY] = ot_trial.number
        return params

    def _next_continued(self):
        """The next lost trial to continue, as an Optuna ``Trial`` (asked again, its stored
        params come back), or None. Numbers no longer RUNNING are passed over: a searcher
        restored from a Tune snapshot keeps its list, and a later resume may have settled
        some of them meanwhile. (``getattr``: searchers pickled before the list existed.)"""
        import optuna
        from optuna.trial import TrialState

        pending = getattr(self, "_continued", [])
        storage, study_id = self._ot_study._storage, self._ot_study._study_id
        while pending:
            number = pending.pop(0)
            try:
                ident = storage.get_trial_id_from_study_id_trial_number(study_id, number)
            except KeyError:
                continue
            if storage.get_trial(ident).state == TrialState.RUNNING:
                return optuna.trial.Trial(self._ot_study, ident)
        return None

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        # Multi-objective studies have no intermediate values; nothing to prune.
        return

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        from optuna.trial import TrialState

        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        if self._told_before(ot_trial):
            # A restored study's trial that the previous driver told before it stopped:
            # Tune reports it complete again; its storage record stands.
            self._completed_trials.add(trial_id)
            return
        if not error and was_pruned(result):
            self._tell_pruned(ot_trial, result, metrics)
            self._completed_trials.add(trial_id)
            return
        reason = failure_reason(result, metrics, error)
        if error and reason is not None:
            # Tune passes no exception; the trainable left its last error on the trial.
            # (``ot_trial.user_attrs`` is this process's stale copy; re-read the storage.)
            trials = self._ot_study.get_trials(deepcopy=False)
            attrs = next(t.user_attrs for t in trials if t.number == ot_trial.number)
            if attrs.get("last_error"):
                attempt = attrs.get("last_error_attempt")
                reason = f"{reason} (attempt {attempt}): {attrs['last_error']}"
        try:
            if reason is None:
                values = [float(result[m]) for m in metrics]
                self._ot_study.tell(ot_trial, values if len(values) > 1 else values[0])
            else:
                ot_trial.set_user_attr("fail_reason", reason)
                self._ot_study.tell(ot_trial, state=TrialState.FAIL)
        except (RuntimeError, ValueError) as exc:
            # Already told (e.g. by a previous driver before a restore): never tell twice.
            log.warning("Optuna trial %s not told again: %s", ot_trial.number, exc)
        self._completed_trials.add(trial_id)

    def _told_before(self, ot_trial) -> bool:
        """Whether the storage already holds ``ot_trial`` finished (this process's copy
        of it is stale after a restore)."""
        for trial in self._ot_study.get_trials(deepcopy=False):
            if trial.number == ot_trial.number:
                return trial.state.is_finished()
        return False

    def _tell_pruned(self, ot_trial, result: dict, metrics: list[str]) -> None:
        from optuna.trial import TrialState

        try:
            for key, value in rung_values(result, cost_objectives(metrics)).items():
                ot_trial.set_user_attr(key, value)
            ot_trial.set_user_attr("state", PRUNED_STATE)
            self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
        except (RuntimeError, ValueError) as exc:
            log.warning("Optuna trial %s not told again: %s", ot_trial.number, exc)
