"""MLflow outages: a real ``mlflow server`` unreachable when a study starts, or killed in
the middle of a trial and started again before the trial ends.

The study runs as a ``bdm-search`` subprocess with its own Ray so that the lowered
``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` / ``MLFLOW_HTTP_REQUEST_TIMEOUT`` reach the Ray Train
controller that logs the curve (a cluster started earlier would keep its own environment).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from fault_support import (
    LRM_STUDY,
    MlflowServer,
    StudyProcess,
    assert_curve_once,
    faults_env,
    free_port,
    study_runs,
    tiny,
    wait_for,
)
from typer.testing import CliRunner

from binarydm.cli import app

BOUNDED_RETRY = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}


def test_unreachable_mlflow_at_start_fails_fast_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    result = CliRunner().invoke(app, [LRM_STUDY, "--tracking-uri", uri])
    elapsed = time.monotonic() - started
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and f"tracking.uri='{uri}' does not answer" in lines[0], lines
    assert elapsed < 30 and list(tmp_path.iterdir()) == []


def _first_curve_point(server: MlflowServer, study: StudyProcess) -> str | None:
    if study.process.poll() is not None:
        raise AssertionError(f"bdm-search exited early:\n{study.output()}")
    client, _, trials = study_runs(server.url)
    for run in trials.get(0, []):
        if client.get_metric_history(run.info.run_id, "loss"):
            return run.info.run_id
    return None


def _buffered_steps(buffer: Path) -> set[int]:
    if not buffer.exists():
        return set()
    steps = set()
    for line in buffer.read_text().splitlines():
        if line.strip():
            entry = json.loads(line)
            steps |= {row[3] for row in entry.get("metrics", []) if row[0] == "loss"}
    return steps


def test_mlflow_down_mid_trial_loses_and_doubles_no_curve_point(tiny_teacher, tmp_path):
    server = MlflowServer(tmp_path / "server")
    server.root.mkdir()
    server.start()
    hold = tmp_path / "hold"
    hold.touch()
    # Rank 0 holds after its step-30 report, so the trial cannot end while MLflow is down.
    env = {**faults_env({"0": {"hold_at_step": 30, "hold_file": str(hold)}}), **BOUNDED_RETRY}
    # Curve points reach MLflow through the driver's callback either way: inline trials.
    args = [LRM_STUDY, *tiny(steps=40, every=10, log_every=5, inline=True), "--trials", "1",
            "--tracking-uri", server.url]  # fmt: skip
    study = StudyProcess(tmp_path, args, env).start()
    try:
        run_id = wait_for(lambda: _first_curve_point(server, study), 600, "the first curve point")
        server.stop()  # a crash, mid-trial
        stopped_at = time.monotonic()
        buffer = Path(tempfile.gettempdir()) / f"bdm-mlflow-{run_id}.jsonl"
        wait_for(lambda: 30 in _buffered_steps(buffer), 300, "step 30 buffered during the outage")
        during = sorted(_buffered_steps(buffer))
        server.start()  # same port, same store
        back_at = time.monotonic()
        hold.unlink()
        assert study.wait(600) == 0, study.output()
        finished = time.monotonic() - back_at
        print(f"\nRECOVERY mlflow-outage: down {back_at - stopped_at:.1f} s, buffered steps "
              f"{during}; trial finished {finished:.1f} s after the restart")  # fmt: skip

        client, parents, trials = study_runs(server.url)
        (run,) = trials[0]
        assert run.info.run_id == run_id and run.info.status == "FINISHED"
        assert len(during) >= 2  # the outage really covered several points
        # Every point once: those logged before the outage, those buffered and replayed,
        # and those after.
        steps = list(range(5, 45, 5))
        assert_curve_once(client, run_id, steps)
        assert_curve_once(client, run_id, steps, metric="lr")
        assert not buffer.exists()  # replayed in full, then removed
        assert parents[0].info.status == "FINISHED" and "fid" in run.data.metrics
    finally:
        study.kill_group(settle_s=10)
        server.stop()
