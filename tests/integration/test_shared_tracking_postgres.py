"""A study on shared stores: PostgreSQL behind ``mlflow server`` and under Optuna, 2 trials at once.

This is the cluster set-up (design.md: stores must outlive the job's directory): MLflow
through its tracking server, whose backend is a Postgres database, and the Optuna study
in another database of the same server. Two trials run concurrently, so both stores see
concurrent writers; every trial must land exactly once in each, and the two must agree.
"""

from __future__ import annotations

import math
import socket
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.timeout(900)

STUDY = "lrm_rank"
TRIALS = 2


@pytest.fixture(scope="module")
def shared_study(postgres, mlflow_server_factory, run_study, study_env, tmp_path_factory):
    root = tmp_path_factory.mktemp("shared_tracking")
    mlflow_url = postgres.create_database("mlflow")
    optuna_url = postgres.create_database("optuna")
    server = mlflow_server_factory(root, mlflow_url, study_env)
    done = run_study(
        [
            "--trials", str(TRIALS), "--set", f"resources.max_concurrent_trials={TRIALS}",
            # The stores are the subject; the FP reference run is covered in tests/search
            # (and through a server in test_mlflow_ui.py), and holding a CPU it would make
            # one of the two trials wait on a 2-core machine.
            "--set", "search.fp_reference=false",
            # Nor is Ray Train's fit (tests/search, tests/fault): inline trials, 5x faster.
            "--set", "workers.inline=true",
            "--tracking-uri", server.url, "--set", f"storage.optuna={optuna_url}",
            "--set", f"storage.ray_results={root / 'ray_results'}",
        ],
        cwd=root, env=study_env,
    )  # fmt: skip
    return SimpleNamespace(root=root, server=server, optuna_url=optuna_url, output=done.stdout)


@pytest.fixture(scope="module")
def mlflow_runs(shared_study):
    """The study's parent run and its child runs, read back through the server."""
    from mlflow import MlflowClient

    client = MlflowClient(shared_study.server.url)
    experiment = client.get_experiment_by_name(STUDY)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    (parent,) = [r for r in runs if r.data.tags.get("bdm.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    trials = [r for r in children if r.data.tags.get("bdm.role") == "trial"]
    references = [r for r in children if r.data.tags.get("bdm.role") == "reference"]
    return SimpleNamespace(
        experiment=experiment, runs=runs, parent=parent, children=trials, references=references
    )


def test_every_trial_is_one_finished_mlflow_run(shared_study, mlflow_runs):
    from binarydm.tracking import load_study_results

    assert mlflow_runs.parent.info.status == "FINISHED"
    trial_ids = sorted(int(r.data.tags["trial_id"]) for r in mlflow_runs.children)
    assert trial_ids == list(range(TRIALS)), "a trial is missing or was logged twice"
    # Nothing but the parent and its trials (no FP reference: search.fp_reference=false).
    assert len(mlflow_runs.runs) == TRIALS + 1 and mlflow_runs.references == []
    records = load_study_results(STUDY, STUDY, tracking_uri=shared_study.server.url)
    assert [r["trial_id"] for r in records] == list(range(TRIALS))
    for record in records:
        assert record["status"] == "FINISHED" and record["attempt"] == 1
        assert math.isfinite(record["metrics"]["fid"]) and record["pareto"] is not None


def test_every_trial_is_one_complete_optuna_trial_matching_mlflow(shared_study, mlflow_runs):
    import optuna

    study = optuna.load_study(study_name=STUDY, storage=shared_study.optuna_url)
    assert [t.number for t in study.trials] == list(range(TRIALS))
    assert {t.state for t in study.trials} == {optuna.trial.TrialState.COMPLETE}
    by_trial = {int(r.data.tags["trial_id"]): r.data.metrics for r in mlflow_runs.children}
    for trial in study.trials:
        metrics = by_trial[trial.number]
        assert trial.values == pytest.approx([metrics["fid"], metrics["test_loss"]])


def test_the_trials_ran_concurrently(mlflow_runs):
    first, second = sorted(mlflow_runs.children, key=lambda r: r.info.start_time)
    assert second.info.start_time < first.info.end_time, "trials ran one after the other"


def test_the_records_are_in_postgres(postgres, shared_study):
    """Not in a SQLite file that a typo in a URL would have silently created instead."""
    for database, query, expected in (
        ("mlflow", "SELECT count(*) FROM runs", TRIALS + 1),
        ("optuna", "SELECT count(*) FROM trials WHERE state = 'COMPLETE'", TRIALS),
    ):
        connection = postgres.connect(database)
        try:
            with connection.cursor() as cursor:
                cursor.execute(query)
                assert cursor.fetchone()[0] == expected, database
        finally:
            connection.close()
    assert not list(shared_study.root.rglob("*.db"))


def test_artifacts_go_through_the_server(shared_study, mlflow_runs):
    """Proxied to the server's store: a folder on the driver is out of other nodes' reach."""
    assert mlflow_runs.experiment.artifact_location.startswith("mlflow-artifacts:")
    stored = shared_study.server.artifacts
    for child in mlflow_runs.children:
        assert list(stored.rglob(f"{child.info.run_id}/artifacts/config.json"))
    assert not (shared_study.root / "mlartifacts").exists()


def test_servers_stop_and_leave_nothing(postgres, shared_study):
    assert shared_study.server.stop() == []
    port = postgres.port
    assert postgres.stop() == []
    for open_port in (shared_study.server.port, port):
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", open_port)) != 0, f"{open_port} still answers"
