"""Launch stamps of a trial attempt, for the study-overhead accounting (benchmarks/
study_overhead.py, the study tests): when its actor's process started and when the
trainable began. Kept apart from the trainable: the /proc parsing is instrumentation,
not part of running a trial.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from binarydm.metric_contract import ACTOR_CREATED, TRIAL_ENTERED, timing

_attempts_in_process = 0


def launch_metrics(entered_unix: float) -> dict[str, float]:
    """How this attempt got going, for the study-overhead accounting: when its actor's
    process started (``timing/actor_created_unix``; Ray may have started it earlier as an idle
    worker; absent for an actor Tune reuses), when this trainable began
    (``timing/trial_entered_unix``) and the time from there to its MLflow run
    (``run_start_s``: imports, store, run lookup)."""
    global _attempts_in_process
    started = process_started_unix() if _attempts_in_process == 0 else None
    _attempts_in_process += 1
    metrics = {TRIAL_ENTERED: entered_unix, timing("run_start_s"): time.time() - entered_unix}
    if started is not None:
        metrics[ACTOR_CREATED] = started
    return metrics


def process_started_unix() -> float | None:
    """When this process started, from Linux's /proc (to the second); None elsewhere."""
    try:
        # Field 22 of /proc/self/stat, counted after the parenthesised command name.
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")
