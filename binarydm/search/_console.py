"""What a study prints around Ray: Tune's output kept for ``--verbose``, the raylet's
start-up notices dropped, secrets masked, and where the results are.

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


def drop_raylet_notices() -> None:
    """Keep the raylet's "N PYTHON worker processes have been started ... startup
    concurrency" warning off the terminal (a trial's Train workers on a small machine
    always trip it); every other message of Ray's error listener still prints.

    The listener thread looks ``print_to_stdstream`` up in its module on each message,
    so wrapping that name is enough; ``--verbose`` leaves it alone.
    """
    from ray._private import worker

    printer = worker.print_to_stdstream
    if getattr(printer, "_binarydm_filtered", False):
        return

    def print_to_stdstream(data, *args, **kwargs):
        if is_raylet_notice(data):
            log.debug("raylet: %s", " ".join(data.get("lines") or []))
            return None
        return printer(data, *args, **kwargs)

    print_to_stdstream._binarydm_filtered = True
    worker.print_to_stdstream = print_to_stdstream


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
    uri = spec.tracking.uri
    # MLflow 3's UI shows an experiment's runs table only in its ML view, chosen in the URL.
    page = f"#/experiments/{experiment_id}?workflowType=machine_learning"
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
