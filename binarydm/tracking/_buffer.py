"""A durable local buffer for MLflow writes, so training survives a tracking-server outage.

MLflow retries an HTTP request a bounded number of times
(``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``MLFLOW_HTTP_REQUEST_TIMEOUT``,
``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR``) and then raises; it has no offline queue.
``BufferedLogger`` wraps a ``StudyTracker``: a param, metric, tag or status write
that still fails is appended to a JSON-lines file (fsynced) and replayed, in
order, by ``flush()`` or by the next write once ``retry_interval_s`` has passed.

No loss: an entry leaves the buffer only after MLflow accepted it. While entries
are pending, new writes queue behind them, so replay never reorders a status or a
tag. No doubling: each entry has an id; after MLflow accepts an entry its id is
appended to the sidecar ``<buffer>.done`` file (fsynced) and never replayed; both
files are removed once everything is replayed. The one window left (a crash after
MLflow accepted an entry, before its id reached ``.done``) is harmless: metrics
carry the timestamp and step of the original call, and SQL stores drop a metric
identical in (key, value, timestamp, step); params skip equal values; tags and
status are overwrites.

One writer process per buffer file (name it after the trial and worker rank).
Run creation (``StudyTracker.trial_run_id``/``start_attempt``) needs the server and
is not buffered: create runs in the driver before training starts.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_METRICS_PER_BATCH

from binarydm.tracking._runs import (
    ParamConflictError,
    StudyTracker,
    check_terminal_status,
    flatten_params,
    metric_value,
)

logger = logging.getLogger(__name__)

# Error codes MLflow raises for an unreachable or overloaded server (a refused connection
# surfaces as INTERNAL_ERROR); anything else is a rejected request that replay cannot fix.
OUTAGE_ERROR_CODES = frozenset(
    {
        "INTERNAL_ERROR",
        "TEMPORARILY_UNAVAILABLE",
        "IO_ERROR",
        "SERVICE_UNDER_MAINTENANCE",
        "WORKSPACE_TEMPORARILY_UNAVAILABLE",
        "DEADLINE_EXCEEDED",
        "RESOURCE_EXHAUSTED",
        "REQUEST_LIMIT_EXCEEDED",
        "ABORTED",
        "CANCELLED",
    }
)


def is_tracking_outage(exc: BaseException) -> bool:
    """True when ``exc`` means "tracking unreachable, try later" rather than "request invalid"."""
    if isinstance(exc, ParamConflictError):
        return False
    if isinstance(exc, MlflowException):
        return exc.error_code in OUTAGE_ERROR_CODES
    # requests' errors are OSErrors; a locked or vanished SQL store raises OperationalError.
    return isinstance(exc, OSError) or type(exc).__name__ == "OperationalError"


class BufferedLogger:
    """Writes through ``tracker``; buffers to ``buffer_path`` what MLflow cannot take now.

    Each write returns True when MLflow took it now, False when it was buffered (or
    dropped because MLflow rejected it as invalid, which is logged). Only caller
    errors raise: a non-numeric metric, an unknown status, a param conflict.
    """

    def __init__(
        self, tracker: StudyTracker, buffer_path: str | Path, retry_interval_s: float = 30.0
    ):
        self.tracker = tracker
        self.buffer_path = Path(buffer_path)
        self.done_path = self.buffer_path.with_name(self.buffer_path.name + ".done")
        self.retry_interval_s = retry_interval_s
        self._lock = threading.Lock()
        self._warned = False
        self._last_outage: float | None = None
        self.buffer_path.parent.mkdir(parents=True, exist_ok=True)
        self._seal_torn_line()
        self._pending = len(self._pending_entries())

    @property
    def pending(self) -> int:
        """Entries waiting for the server."""
        return self._pending

    # ------------------------------------------------------------------ writes
    def log_params(self, run_id: str, params: Mapping[str, Any]) -> bool:
        return self._write({"op": "params", "run_id": run_id, "params": flatten_params(params)})

    def log_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int | None = None) -> bool:
        # The call's own timestamp travels with the entry: replay then re-sends an identical
        # metric, which is what makes a replay after a crash idempotent.
        stamp = int(time.time() * 1000)
        rows = [
            [key, metric_value(key, value), stamp, int(step or 0)]
            for key, value in metrics.items()
            if value is not None
        ]
        return self._write({"op": "metrics", "run_id": run_id, "metrics": rows}) if rows else True

    def log_training_curve(self, run_id: str, rows: Sequence[Mapping[str, Any]]) -> bool:
        stamp = int(time.time() * 1000)
        entries = []
        for row in rows:
            if "step" not in row:
                raise ValueError(f"training-curve row {dict(row)!r} has no 'step'")
            at = int(row.get("timestamp_ms", stamp))
            for key, value in row.items():
                if key not in ("step", "timestamp_ms") and value is not None:
                    entries.append([key, metric_value(key, value), at, int(row["step"])])
        return self._write({"op": "metrics", "run_id": run_id, "metrics": entries})

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> bool:
        return self._write(
            {"op": "tags", "run_id": run_id, "tags": {k: str(v) for k, v in tags.items()}}
        )

    def finish_trial(self, run_id: str, status: str, error: str | None = None) -> bool:
        check_terminal_status(status)
        return self._write({"op": "status", "run_id": run_id, "status": status, "error": error})

    def flush(self) -> int:
        """Replay pending entries in order; returns how many are still pending (0: all sent)."""
        with self._lock:
            return self._flush_locked()

    close = flush

    # ------------------------------------------------------------------ internals
    def _write(self, entry: dict[str, Any]) -> bool:
        entry["id"] = uuid.uuid4().hex
        with self._lock:
            # Never overtake buffered writes: a FINISHED status or a tag must land after
            # what was logged before it.
            if self._pending and not self._drain_if_due():
                self._append(entry)
                return False
            try:
                self._apply([entry])
                return True
            except ParamConflictError:
                raise
            except Exception as exc:
                if not is_tracking_outage(exc):
                    logger.error(
                        "MLflow rejected %s for run %s, dropped: %s",
                        entry["op"],
                        entry["run_id"],
                        exc,
                    )
                    return False
                self._note_outage(exc)
                self._append(entry)
                return False

    def _drain_if_due(self) -> bool:
        due = self._last_outage is None or (
            time.monotonic() - self._last_outage >= self.retry_interval_s
        )
        return due and self._flush_locked() == 0

    def _apply(self, group: list[dict[str, Any]]) -> None:
        first = group[0]
        run_id, op = first["run_id"], first["op"]
        if op == "metrics":
            metrics = [Metric(k, v, ts, step) for e in group for k, v, ts, step in e["metrics"]]
            self.tracker.log_metric_entities(run_id, metrics)
        elif op == "params":
            self.tracker.log_params(run_id, first["params"])
        elif op == "tags":
            self.tracker.set_tags(run_id, first["tags"])
        elif op == "status":
            self.tracker.finish_trial(run_id, first["status"], first["error"])
        else:
            raise ValueError(f"unknown buffered operation {op!r} in {self.buffer_path}")

    def _flush_locked(self) -> int:
        entries = self._pending_entries()
        sent = 0
        for group in _groups(entries):
            try:
                self._apply(group)
            except Exception as exc:
                if is_tracking_outage(exc):
                    self._note_outage(exc)
                    self._pending = len(entries) - sent
                    return self._pending
                # Replay cannot fix a rejected entry; keeping it would block the queue forever.
                logger.error(
                    "MLflow rejected buffered %s for run %s, dropped: %s",
                    group[0]["op"],
                    group[0]["run_id"],
                    exc,
                )
            self._mark_done([e["id"] for e in group])
            sent += len(group)
        self._clear()
        if entries:
            logger.warning("replayed %d buffered MLflow writes from %s", sent, self.buffer_path)
        self._pending, self._warned, self._last_outage = 0, False, None
        return 0

    def _note_outage(self, exc: BaseException) -> None:
        self._last_outage = time.monotonic()
        if self._warned:
            return
        self._warned = True
        message = (
            f"MLflow at {self.tracker.tracking_uri} is unreachable ({exc}); buffering writes in "
            f"{self.buffer_path} and replaying them when it answers again (flush(), or the next "
            f"write after {self.retry_interval_s:g} s). Training goes on. To block training "
            "less per failed write, lower MLFLOW_HTTP_REQUEST_MAX_RETRIES and "
            "MLFLOW_HTTP_REQUEST_TIMEOUT."
        )
        logger.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)

    def _append(self, entry: dict[str, Any]) -> None:
        try:
            _append_line(self.buffer_path, json.dumps(entry))
        except OSError as exc:  # disk full or read-only: lose this write, not the training
            logger.error(
                "cannot buffer MLflow %s to %s, dropped: %s", entry["op"], self.buffer_path, exc
            )
            return
        self._pending += 1

    def _mark_done(self, ids: list[str]) -> None:
        _append_line(self.done_path, "\n".join(ids))

    def _clear(self) -> None:
        # Buffer first: a crash in between leaves only stale ids, which match nothing.
        for path in (self.buffer_path, self.done_path):
            path.unlink(missing_ok=True)

    def _seal_torn_line(self) -> None:
        # A crash mid-append leaves a line without "\n"; end it so the next append does not
        # glue a valid entry onto the fragment.
        for path in (self.buffer_path, self.done_path):
            if path.exists() and path.stat().st_size:
                with path.open("rb") as handle:
                    handle.seek(-1, os.SEEK_END)
                    torn = handle.read(1) != b"\n"
                if torn:
                    _append_line(path, "")

    def _pending_entries(self) -> list[dict[str, Any]]:
        if not self.buffer_path.exists():
            return []
        done = set(self.done_path.read_text().split()) if self.done_path.exists() else set()
        entries = []
        for number, line in enumerate(self.buffer_path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("skipping torn line %d of %s", number, self.buffer_path)
                continue
            if entry["id"] not in done:
                entries.append(entry)
        return entries


def _groups(entries: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """Consecutive metric entries of one run merged up to one batch; everything else alone."""
    group: list[dict[str, Any]] = []
    size = 0
    for entry in entries:
        mergeable = (
            group
            and entry["op"] == "metrics"
            and group[0]["op"] == "metrics"
            and entry["run_id"] == group[0]["run_id"]
            and size + len(entry["metrics"]) <= MAX_METRICS_PER_BATCH
        )
        if not mergeable and group:
            yield group
            group, size = [], 0
        group.append(entry)
        size += len(entry["metrics"]) if entry["op"] == "metrics" else 0
    if group:
        yield group


def _append_line(path: Path, text: str) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(text + "\n")
        handle.flush()
        os.fsync(handle.fileno())
