"""Callbacks of a study: live training curves to MLflow, live trial table in the terminal.

``MlflowCurveCallback`` is a Ray Train callback: it runs in the Train controller
(for an inline run, in the trial) and logs every report (loss, loss_lrm, ... at its
step) to the trial's MLflow run through the durable buffer, so an MLflow outage never
stops training.
``PrunedRunRecorder`` is a Ray Tune callback in the driver that ends the MLflow run of a
trial the early-stopping scheduler stopped: KILLED, tags ``state=PRUNED`` and
``pruned=true``, its rung's proxy at the rung's step (the trial itself was stopped in a
report, so it cannot).
``StudyProgress`` is a Ray Tune callback in the driver that keeps a rich table of
trials (state, parameters, latest metrics).
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

from ray.train.v2.api.callback import UserCallback
from ray.tune import Callback

from binarydm.metric_contract import CURVE_METRICS, PROXY_METRICS, PROXY_TIMINGS, RUNG_STEP

#: What a rung logs to the trial's run at the rung's step: its proxies and their seconds.
RUNG_LOGGED = (*PROXY_METRICS, *PROXY_TIMINGS)


class MlflowCurveCallback(UserCallback):
    """Log each Ray Train report's training metrics to an MLflow run, at its step."""

    def __init__(self, tracker, run_id: str, prefix: str = "") -> None:
        self.tracker = tracker
        self.run_id = run_id
        self.prefix = prefix
        self._logger = None

    def _buffered(self):
        if self._logger is None:
            self._logger = curve_buffer(self.tracker, self.run_id, self.prefix)
        return self._logger

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if not metrics or "step" not in metrics[0] or metrics[0].get("final"):
            return  # the final report repeats the last training step's metrics
        report = metrics[0]
        values = {
            f"{self.prefix}{k}": float(report[k])
            for k in CURVE_METRICS
            if isinstance(report.get(k), int | float) and math.isfinite(report[k])
        }
        # An early-stopping rung's proxy and its cost (first seed only, so no seed prefix).
        values.update(
            {k: float(report[k]) for k in RUNG_LOGGED if isinstance(report.get(k), int | float)}
        )
        if values:
            self._buffered().log_metrics(self.run_id, values, step=int(report["step"]))


class InlineTuneReport:
    """Forward every report of an inline run (``workers.inline``) to Ray Tune.

    What ``TuneReportCallback`` does for a Ray Train fit, without the queue actor it
    starts to cross from the Train controller: an inline loop already runs in the trial.
    """

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        import ray.tune

        report = dict(metrics[0])
        if checkpoint is not None:
            report["checkpoint_path"] = checkpoint.path
        ray.tune.report(report)


def curve_buffer(tracker, run_id: str, prefix: str = ""):
    """The durable MLflow buffer of one trial's curve (one writer per file, named by run)."""
    from binarydm.tracking import BufferedLogger

    path = Path(tempfile.gettempdir()) / f"bdm-mlflow-{run_id}{prefix.rstrip('.')}.jsonl"
    return BufferedLogger(tracker, path)


class PrunedRunRecorder(Callback):
    """End the MLflow run of every trial stopped at a rung (``_early_stop.was_pruned``)."""

    def __init__(self, spec) -> None:
        self.spec = spec  # resolved paths; the tracker is built in the driver that runs it
        self.metrics = spec.search.metrics
        self._tracker = None

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the experiment (``--resume``): no MLflow client.
        return {**self.__dict__, "_tracker": None}

    @property
    def tracker(self):
        if self._tracker is None:
            from binarydm.tracking import StudyTracker

            self._tracker = StudyTracker.for_study(self.spec)
        return self._tracker

    def on_trial_complete(self, iteration, trials, trial, **info):
        from binarydm.search._early_stop import PRUNED_STATE, rung_values, was_pruned
        from binarydm.search._searcher import TRIAL_NUMBER_KEY
        from binarydm.spec import cost_objectives

        result = trial.last_result
        if not was_pruned(result) or TRIAL_NUMBER_KEY not in trial.config:
            return
        number = int(trial.config[TRIAL_NUMBER_KEY])
        run_id = self.tracker.trial_run_id(number)
        values = rung_values(result, cost_objectives(self.metrics))
        step = int(values.pop(RUNG_STEP))
        rung = int(values.pop("rung"))
        proxies = {k: v for k, v in values.items() if k in RUNG_LOGGED}
        self.tracker.log_metrics(run_id, proxies, step=step)
        self.tracker.set_tags(
            run_id, {"state": PRUNED_STATE, "pruned": "true", "rung": rung, RUNG_STEP: step}
        )
        self.tracker.finish_trial(run_id, "KILLED")


class StudyProgress(Callback):
    """A live table: one row per trial with its state, progress (training step and ETA,
    then evaluation), sampled parameters and metrics."""

    def __init__(
        self,
        dimensions: list[str],
        metrics: list[str],
        *,
        enabled: bool = True,
        steps: int | None = None,
        seeds: int = 1,
    ) -> None:
        self.dimensions = dimensions
        self.metrics = metrics
        self.enabled = enabled
        self.steps = steps  # training.steps unless the trial's config samples it
        self.seeds = seeds
        self.headers = short_headers(dimensions)
        self.rows: dict[str, dict[str, Any]] = {}
        self._live = None
        self._last = 0.0

    def _row(self, trial) -> dict[str, Any]:
        return self.rows.setdefault(trial.trial_id, {"state": "PENDING", "metrics": {}})

    def _table(self, width: int | None = None):
        """The table as wide as the terminal (``width``, else the console's): searched
        params that do not fit are left out, last first, and counted in its caption.
        (Rich squeezed all 14 of joint.yaml's into 2-character columns on 110.)"""
        from rich import get_console

        console = get_console()
        width = width or console.width
        unbounded = console.options.update_width(1_000_000)  # the table's natural width
        for shown in range(len(self.dimensions), -1, -1):
            table = self._table_of(self.dimensions[:shown])
            if shown == 0 or console.measure(table, options=unbounded).maximum <= width:
                break
        hidden = len(self.dimensions) - shown
        if hidden:
            table.caption = (
                f"{hidden} of {len(self.dimensions)} searched params left out to fit "
                f"{width} columns (every one is in MLflow and the parent's trials.csv)"
            )
        return table

    def _table_of(self, dimensions: list[str]):
        from rich.table import Table

        table = Table(title="BinaryDM study", expand=False)
        table.add_column("trial", no_wrap=True)
        table.add_column("state", no_wrap=True)
        # As wide as it will get ("1500/2000 ETA 12:34"): the fit does not change each step.
        longest = len(f"{self.steps}/{self.steps} ETA 00:00") if self.steps else 0
        table.add_column("progress", no_wrap=True, min_width=max(longest, len("evaluating")))
        for dim in dimensions:
            table.add_column(self.headers[dim], overflow="fold")
        for metric in ["step", "loss", *self.metrics]:
            table.add_column(metric, justify="right", no_wrap=True)
        for row in self.rows.values():
            config = row.get("config", {})
            cells = [str(row.get("number", "?")), row["state"], progress_cell(row)]
            cells += [_fmt(config.get(dim)) for dim in dimensions]
            cells += [_fmt(row["metrics"].get(m)) for m in ["step", "loss", *self.metrics]]
            table.add_row(*cells)
        return table

    def _refresh(self, force: bool = False) -> None:
        if not self.enabled:
            return
        if self._live is None:
            from rich.live import Live

            self._live = Live(self._table(), refresh_per_second=2, transient=False)
            self._live.start()
        if force or time.monotonic() - self._last > 0.5:
            self._live.update(self._table())
            self._last = time.monotonic()

    def on_trial_start(self, iteration, trials, trial, **info):
        from binarydm.search._searcher import TRIAL_NUMBER_KEY

        row = self._row(trial)
        row.update(state="RUNNING", config=trial.config, number=trial.config.get(TRIAL_NUMBER_KEY))
        row["steps"] = trial.config.get("training.steps", self.steps)
        row["seeds"] = self.seeds
        self._refresh(force=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        row = self._row(trial)
        row["metrics"].update({k: v for k, v in result.items() if isinstance(v, int | float)})
        track_progress(row, result, time.monotonic())
        self._refresh()

    def on_trial_complete(self, iteration, trials, trial, **info):
        from binarydm.search._early_stop import was_pruned

        self._row(trial)["state"] = "PRUNED" if was_pruned(trial.last_result) else "DONE"
        self._refresh(force=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._row(trial)["state"] = "FAILED"
        self._refresh(force=True)

    def on_experiment_end(self, trials, **info):
        if self._live is not None:
            self._live.update(self._table())
            self._live.stop()
            if not self._live.console.is_terminal:
                # Rich ends a redirected Live's last render without a newline: the next
                # line (the Pareto table, the Ctrl-C message) would continue its caption.
                self._live.console.line()
            self._live = None


def short_headers(dimensions: list[str]) -> dict[str, str]:
    """Each searched key's column header: the key without its section, one part a line
    (``method.lrm.rank_divisor`` -> ``lrm`` over ``rank_divisor``), so more columns fit."""
    return {dim: "\n".join(dim.split(".")[1:] or [dim]) for dim in dimensions}


def track_progress(row: dict[str, Any], result: dict[str, Any], now: float) -> None:
    """Update a table row's training progress from one of its trial's results.

    Seeds train one after another, each from step 0: a step below the last one seen
    starts the next seed (or is a retry from a checkpoint). The rate is measured since."""
    step = result.get("step")
    if result.get("final") or not isinstance(step, int | float):
        return
    step = int(step)
    if step < row.get("step", -1):
        # The next seed, or a retry resuming from an earlier checkpoint (with one seed
        # left, or with one seed only, it can be nothing else): the rate starts again.
        if row.get("seed_index", 0) + 1 < row.get("seeds", 1):
            row["seed_index"] = row.get("seed_index", 0) + 1
        row.pop("first_seen", None)
    row["step"] = step
    if "first_seen" not in row:
        row["first_seen"] = (step, now)
    row["last_seen"] = (step, now)


def progress_cell(row: dict[str, Any]) -> str:
    """``step/steps`` with an ETA while training, ``evaluating`` after the last step
    (sampling and FID report nothing until the trial ends), the seed when there are
    several."""
    if row.get("state") != "RUNNING" or "step" not in row:
        return ""
    steps, step = row.get("steps"), row["step"]
    seeds = row.get("seeds", 1)
    seed = f"seed {row.get('seed_index', 0) + 1}/{seeds} " if seeds > 1 else ""
    if not steps:
        return f"{seed}step {step}"
    if step >= steps:
        return f"{seed}evaluating"
    (s0, t0), (s1, t1) = row["first_seen"], row["last_seen"]
    eta = ""
    if s1 > s0 and t1 > t0:
        remaining = (steps - step) / ((s1 - s0) / (t1 - t0))
        eta = f" ETA {int(remaining // 60)}:{int(remaining % 60):02d}"
    return f"{seed}{step}/{steps}{eta}"


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
