"""The tracker over HTTP against a real ``mlflow server``, and the buffer across a server outage.

One server per module (it takes seconds to start on a small machine); the outage
test kills it and starts it again on the same port and store, so it runs last.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from binarydm.tracking import BufferedLogger, StudyTracker, load_study_results

EXPERIMENT = "binarydm-http"
START_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """An ``mlflow server`` subprocess in its own process group, so stopping it leaves nothing."""

    def __init__(self, root: Path):
        self.root = root
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = root / "server.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        # The job runner spawns seven huey consumers and nearly doubles start-up on 2 cores.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:  # crashed: the log says why
                break
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                time.sleep(0.25)
        tail = self.log_path.read_text(errors="replace")[-3000:]
        self.stop()
        pytest.fail(f"mlflow server at {self.url} did not become healthy; log tail:\n{tail}")

    def stop(self) -> None:
        """SIGKILL to the group led by the PID we started: a crash, and no straggling uvicorn."""
        if self.process is None:
            return
        # Even when the CLI parent already died, its uvicorn child may live on in the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        self.process = None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    running.start()
    yield running
    running.stop()


def test_tracker_flow_over_http(server, tmp_path):
    tracker = StudyTracker(server.url, EXPERIMENT, "http_study")
    parent = tracker.parent_run_id()
    run_id, attempt = tracker.start_attempt(0)
    assert attempt == 1
    resumed = StudyTracker(server.url, EXPERIMENT, "http_study")
    assert (resumed.parent_run_id(), resumed.trial_run_id(0)) == (parent, run_id)
    assert resumed.start_attempt(0) == (run_id, 2)

    assert tracker.log_params(run_id, {"weight": {"bases": 2}, "seed": 0}) == {
        "weight.bases": "2",
        "seed": "0",
    }
    assert tracker.log_params(run_id, {"weight": {"bases": 2}}) == {}
    tracker.log_metrics(run_id, {"fid": 12.5, "ops_g": 0.8})
    tracker.log_training_curve(run_id, [{"step": s, "loss": 1.0 / (s + 1)} for s in range(50)])
    tracker.log_artifact_json(run_id, "config.json", {"weight": {"bases": 2}})
    tracker.finish_trial(run_id, "FINISHED")
    tracker.mark_pareto({0: run_id}, {0})
    tracker.log_study_summary(
        [("fid", "minimize"), ("ops_g", "minimize")], {"fid": 50.0, "ops_g": 2.0}, 45.4,
        {"COMPLETE": 1}, "objectives: [fid, ops_g]\n",
    )  # fmt: skip

    assert {f.path for f in tracker.client.list_artifacts(run_id)} == {"config.json"}
    assert (server.root / "artifacts").is_dir()  # proxied to the server's destination
    (record,) = load_study_results(EXPERIMENT, "http_study", tracking_uri=server.url)
    assert record["run_id"] == run_id and record["attempt"] == 2 and record["pareto"] is True
    assert record["metrics"]["fid"] == 12.5 and record["status"] == "FINISHED"
    assert len(tracker.client.get_metric_history(run_id, "loss")) == 50


def test_buffer_survives_a_server_outage(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    tracker = StudyTracker(server.url, EXPERIMENT, "outage_study")
    run_id, _ = tracker.start_attempt(0)
    logger = BufferedLogger(tracker, tmp_path / "trial-0.jsonl", retry_interval_s=0.0)
    for step in range(3):
        assert logger.log_metrics(run_id, {"loss": 1.0 / (step + 1)}, step=step) is True

    server.stop()  # a crash: no graceful shutdown
    started = time.monotonic()
    with pytest.warns(RuntimeWarning, match="unreachable"):
        for step in range(3, 10):
            assert logger.log_metrics(run_id, {"loss": 1.0 / (step + 1)}, step=step) is False
        assert logger.set_tags(run_id, {"phase": "after-outage"}) is False
        assert logger.finish_trial(run_id, "FINISHED") is False
    assert time.monotonic() - started < 10
    assert logger.pending == 9

    server.start()  # same port, same store
    assert logger.flush() == 0
    assert logger.flush() == 0  # nothing left to send twice
    history = tracker.client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(10))  # each step exactly once
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["phase"] == "after-outage"
