"""What a study prints around Ray: Tune's output kept for ``--verbose``, the raylet's
start-up notices and the workers' log lines dropped (their progress bars kept where no
live table shows progress), secrets masked, and where the results are.

Tune's new output engine prints its configuration box and a TensorBoard hint whatever
``RunConfig.verbose`` says; the raylet's "startup concurrency" notice reaches every
driver. Neither tells a user anything they can act on, so both are kept out of the
default output, and the results' locations are printed instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any

from binarydm.spec import StudySpec

log = logging.getLogger(__name__)

_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*):[^@\s]*@")


_AIR_NEW_OUTPUT = "RAY_AIR_NEW_OUTPUT"


ANALYSIS_LOG = "ray.tune.analysis.experiment_analysis"


#: Raylet notices pushed to every driver that say nothing about the study's results.
RAYLET_NOTICES = ("the maximum expected startup concurrency",)


def is_raylet_notice(data: dict[str, Any]) -> bool:
    """Whether a message Ray's error listener prints is a benign raylet notice."""
    lines = data.get("lines") or []
    return data.get("pid") == "raylet" and any(
        notice in line for line in lines for notice in RAYLET_NOTICES
    )


#: Set while the workers' progress bars (``ray.experimental.tqdm_ray``) may reach the
#: terminal: the FP teacher's pretraining and ``bdm-search trial``. During a study's
#: trials the live table (``StudyProgress``) shows their progress instead.
_worker_progress = threading.Event()
#: Set by ``quiet_ray_output``, cleared by ``loud_ray_output`` (a ``--verbose`` driver).
_quiet = threading.Event()


def loud_ray_output() -> None:
    """Undo ``quiet_ray_output`` for this process: Ray's output prints as it comes."""
    _quiet.clear()


@contextlib.contextmanager
def worker_progress():
    """Let the workers' progress bars through to the terminal inside the block."""
    _worker_progress.set()
    try:
        yield
    finally:
        _worker_progress.clear()
        _close_worker_bars()


def _close_worker_bars() -> None:
    """Close the bars the driver still draws for workers: a worker that ended (the
    teacher's) sends no more updates, and Ray's bar manager would redraw its last state
    under every later line until the driver exits."""
    from ray.experimental import tqdm_ray

    manager = getattr(tqdm_ray, "_manager", None)  # None: no bar was ever drawn
    groups = getattr(manager, "bar_groups", None)
    if not groups:
        return
    with manager.lock:
        for group in groups.values():
            for bar in group.bars_by_uuid.values():
                bar.bar.close()
            group.bars_by_uuid.clear()
        groups.clear()


def shown_batch(data: dict[str, Any], *, progress: bool) -> dict[str, Any] | None:
    """What a quiet driver prints of one batch Ray forwards (None: nothing).

    The raylet's startup-concurrency notice: nothing; its other messages (Ray's error
    listener): as they are; the autoscaler's ("resource request cannot be scheduled
    right now" while trials hold the cluster, expected in a study): nothing; a worker's
    output: its progress-bar lines while ``progress`` (``shown_worker_lines``)."""
    pid = data.get("pid")
    if is_raylet_notice(data) or pid == "autoscaler":
        return None
    if pid == "raylet":
        return data
    lines = shown_worker_lines(data, progress)
    return {**data, "lines": lines} if lines else None


def shown_worker_lines(data: dict[str, Any], progress: bool) -> list[str]:
    """The lines of a worker's output batch that a non-verbose driver prints: its
    progress-bar updates while ``progress``, nothing else (the raylet's own errors are
    Ray's error listener's, not worker output)."""
    from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC

    if not progress:
        return []
    return [line for line in data.get("lines") or [] if RAY_TQDM_MAGIC in line]


def quiet_ray_output() -> None:
    """What a non-verbose driver prints of Ray's forwarded output (call before
    ``ray.init(log_to_driver=True)``):

    - never the raylet's "N PYTHON worker processes have been started ... startup
      concurrency" warning (a trial's Train workers on a small machine always trip it);
      every other message of Ray's error listener still prints;
    - of the workers' own output only their progress bars, and only inside
      ``worker_progress()`` (the teacher's pretraining, ``bdm-search trial``); the rest,
      and the autoscaler's scheduling notices, go to this module's debug log.

    Ray binds ``print_to_stdstream`` for worker output when it connects and the error
    listener looks the name up on each message, so wrapping the name before
    ``ray.init`` covers both; ``--verbose`` leaves it alone.
    """
    from ray._private import worker

    _quiet.set()
    printer = worker.print_to_stdstream
    if getattr(printer, "_binarydm_filtered", False):
        return

    def print_to_stdstream(data, *args, **kwargs):
        if not _quiet.is_set():  # a later --verbose connect in this process
            return printer(data, *args, **kwargs)
        shown = shown_batch(data, progress=_worker_progress.is_set())
        if shown is None or len(shown["lines"]) < len(data.get("lines") or []):
            log.debug("%s: %s", data.get("pid"), " ".join(data.get("lines") or []))
        return None if shown is None else printer(shown, *args, **kwargs)

    print_to_stdstream._binarydm_filtered = True
    worker.print_to_stdstream = print_to_stdstream


#: Library notices a non-verbose study drops: (logger, message start). The token one is
#: Ray's note that the local cluster this driver starts has token auth on, its secure
#: default (the "disabled" warning still prints); MLflow's are its first-use table set-up.
LIBRARY_NOTICES = (
    ("ray._private.authentication.authentication_token_setup",
     "Token authentication is enabled for this Ray cluster"),
    ("mlflow.store.db.utils", "Creating initial MLflow database tables"),
    ("mlflow.store.db.utils", "Updating database tables"),
)  # fmt: skip


class _DropNotices(logging.Filter):
    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def quiet_library_notices() -> None:
    """Drop ``LIBRARY_NOTICES`` from their loggers (idempotent); ``--verbose`` skips it."""
    by_logger: dict[str, tuple[str, ...]] = {}
    for name, start in LIBRARY_NOTICES:
        by_logger[name] = (*by_logger.get(name, ()), start)
    for name, starts in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotices) for f in logger.filters):
            logger.addFilter(_DropNotices(starts))


@contextlib.contextmanager
def tune_output(verbose: bool):
    """Ray Tune's own terminal output only with ``--verbose``.

    Tune's new output engine prints its "Configuration for experiment" box, the results
    folder and a TensorBoard command at every start, whatever ``RunConfig.verbose`` says;
    its legacy engine at verbosity 0 prints nothing but warnings and errors. Of those only
    errors show: on Ctrl-C its warnings suggest ``Tuner.restore`` and list unfetched
    metrics, where the CLI prints the ``--resume`` command. The study's own table
    (``StudyProgress``) and the results' location replace them.
    """
    if verbose:
        yield
        return
    before = os.environ.get(_AIR_NEW_OUTPUT)
    tune_log = logging.getLogger("ray.tune")
    level = tune_log.level
    os.environ[_AIR_NEW_OUTPUT] = "0"
    tune_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        tune_log.setLevel(level)
        if before is None:
            os.environ.pop(_AIR_NEW_OUTPUT, None)
        else:
            os.environ[_AIR_NEW_OUTPUT] = before


def mask_secrets(text: str) -> str:
    """``scheme://user:password@host`` -> ``scheme://user:***@host`` everywhere in ``text``."""
    return _URL_PASSWORD.sub(r"\g<head>:***@", text)


def results_location(
    spec: StudySpec, experiment_id: str, dashboard_url: str | None = None
) -> dict[str, Any]:
    """Where a study's results are: its MLflow store, the command and address of the MLflow
    UI's runs table, the Ray dashboard (when one runs), Ray's and Optuna's storage."""
    from binarydm.tracking._runs import ui_page

    uri = spec.tracking.uri
    # MLflow 3's UI shows an experiment's runs table only in its ML view, chosen in the URL.
    page = ui_page(experiment_id)
    if uri.startswith(("http://", "https://")):
        command, address = None, f"{uri.rstrip('/')}/{page}"
    else:
        command, address = f"mlflow ui --backend-store-uri {uri}", f"http://127.0.0.1:5000/{page}"
    return {
        "tracking_uri": mask_secrets(uri),
        "experiment_id": experiment_id,
        "mlflow_ui": mask_secrets(command) if command else None,
        "mlflow_url": mask_secrets(address),
        "ray_dashboard": dashboard_url,
        "ray_results": str(Path(spec.storage.ray_results) / spec.name),
        "optuna": mask_secrets(spec.storage.optuna),
    }


def teacher_notice(settings, cached: Path | None) -> str:
    """One line saying which FP teacher a study uses: given, cached, or pretrained now.

    ``cached``: where the cache keeps this teacher (``train.cached_teacher_dir``), None
    for ``teacher.pretrained``."""
    teacher, data = settings.teacher, settings.data
    if cached is None:
        return f"FP teacher: {teacher.pretrained} (teacher.pretrained)"
    if (cached / "config.json").exists():
        return f"FP teacher: reusing the cached one in {cached}"
    return (
        f"FP teacher: pretraining {teacher.preset} on {data.source} at {data.resolution} px "
        f"for {teacher.steps} steps (once: cached in {cached} for later studies)"
    )


def interrupted_message(spec, command: str) -> str:
    """What an interrupted study kept, and how to continue it (``spec``: paths resolved)."""
    return (
        "interrupted: finished trials are saved, unfinished ones continue on resume\n"
        f"  MLflow runs:  {spec.tracking.uri}\n"
        f"  Optuna study: {spec.storage.optuna} (study {spec.name!r})\n"
        f"  Tune state:   {Path(spec.storage.ray_results) / spec.name}\n"
        f"continue with:\n  {command}"
    )


def location_lines(location: dict) -> list[str]:
    """Where a study's results are, as printed at its start and end."""
    lines = [f"MLflow: {location['tracking_uri']} (experiment id {location['experiment_id']})"]
    if location.get("mlflow_ui"):
        lines.append(f"  browse: {location['mlflow_ui']}")
        lines.append(f"  then open {location['mlflow_url']}")
    else:
        lines.append(f"  browse: {location['mlflow_url']}")
    if location.get("ray_dashboard"):
        lines.append(f"Ray dashboard: {location['ray_dashboard']}")
    return lines
