"""The tracker over HTTP against a real ``mlflow server``, and the buffer across a server outage.

One server per module (it takes seconds to start on a small machine); the outage
test kills it and starts it again on the same port and store, so it runs last.
"""

from __future__ import annotations

import time

import pytest
from bdm_support import MlflowServer

from binarydm.tracking import BufferedLogger, StudyTracker, load_study_results

EXPERIMENT = "binarydm-http"


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
