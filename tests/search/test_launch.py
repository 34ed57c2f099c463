"""The launch stamps a trial logs for the study-overhead accounting."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from binarydm.search import _launch


def test_process_start_time_matches_a_child_started_now():
    before = time.time()
    out = subprocess.run(
        [sys.executable, "-c", "import time; from binarydm.search._launch import "
         "process_started_unix as s; print(s(), time.time())"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    started, now = float(out[0]), float(out[1])
    # /proc's boot time is whole seconds, so the start may read up to 1 s early.
    assert before - 1.0 <= started <= now


def test_only_a_fresh_process_reports_its_start(monkeypatch):
    monkeypatch.setattr(_launch, "_attempts_in_process", 0)
    entered = time.time()
    first = _launch.launch_metrics(entered)
    assert first["timing/actor_created_unix"] == pytest.approx(_launch.process_started_unix())
    assert first["timing/trial_entered_unix"] == entered and first["timing/run_start_s"] >= 0
    # A second trial in the same (reused) actor: its process started long before.
    assert "timing/actor_created_unix" not in _launch.launch_metrics(time.time())
