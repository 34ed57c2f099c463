"""Faults inside a trial, on the session's local Ray: a killed worker, a corrupt checkpoint,
a raising (OOM) trial with and without retries, and a NaN loss.

Faults are injected the way Ray's own tests do it: marker files decide when a worker
fails or holds, and ``$BINARYDM_FAULTS`` routes them to one Optuna trial of a study.
Each test states its recovery time on stdout (``pytest -s``); benchmarks/results/faults.md
records them.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from bdm_support import tiny_settings
from fault_support import (
    LRM_STUDY,
    assert_curve_once,
    faults_env,
    optuna_trials,
    registered_step,
    sqlite_uri,
    study_runs,
    tiny,
    wait_for,
)
from typer.testing import CliRunner

from binarydm.cli import app
from binarydm.train._runner import final_metrics, fit_qat
from binarydm.train.job import FaultPlan

TRIAL0_RUN_DIR = Path("ray_results") / "trials" / "lrm_rank-trial0000-seed0"


def _kill_when_registered(
    run_dir: Path,
    step: int,
    pid_file: Path,
    hold_file: Path,
    timings: dict,
    registered=registered_step,
    replacement: str = "a replacement worker",
) -> None:
    """Kill rank 0 (held after its step-``step`` report) once its run registered that
    checkpoint (``registered(run_dir)``: the newest registered step): runs resume from
    registered checkpoints only."""
    wait_for(lambda: registered(run_dir) >= step, 240, f"checkpoint {step} in {run_dir}")
    timings["killed_pid"] = int(pid_file.read_text())
    timings["killed_at"] = time.monotonic()
    os.kill(timings["killed_pid"], signal.SIGKILL)
    hold_file.unlink()  # a refit from an older checkpoint must not hold again
    # The replacement worker writes its own PID: that is the restart.
    wait_for(
        lambda: pid_file.read_text().strip() not in ("", str(timings["killed_pid"])),
        240,
        replacement,
    )
    timings["restarted_at"] = time.monotonic()


def test_worker_killed_mid_trial_resumes_under_one_mlflow_run(tiny_teacher, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pid_file, hold = tmp_path / "worker.pid", tmp_path / "hold"
    hold.touch()
    plan = {"0": {"pid_file": str(pid_file), "hold_at_step": 20, "hold_file": str(hold)}}
    for key, value in faults_env(plan).items():
        monkeypatch.setenv(key, value)
    timings: dict = {}
    killer = threading.Thread(
        target=_kill_when_registered,
        args=(tmp_path / TRIAL0_RUN_DIR, 20, pid_file, hold, timings),
        daemon=True,
    )
    killer.start()
    result = CliRunner().invoke(app, [LRM_STUDY, *tiny(steps=40), "--trials", "1"])
    killer.join(timeout=5)
    assert result.exit_code == 0, result.output
    assert "killed_at" in timings, "the worker was never killed"

    client, parents, trials = study_runs(sqlite_uri(tmp_path, "mlflow.db"))
    assert len(parents) == 1 and list(trials) == [0] and len(trials[0]) == 1  # ONE run
    run = trials[0][0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["attempt"] == "1"  # a Train-level restart is not a new attempt
    # Resumed from step 20: steps 10 and 20 were not trained (nor logged) a second time.
    assert_curve_once(client, run.info.run_id, [10, 20, 30, 40])
    assert "fid" in run.data.metrics
    assert optuna_trials(tmp_path)[0].state.name == "COMPLETE"
    recovery = timings["restarted_at"] - timings["killed_at"]
    print(f"\nRECOVERY worker-kill-in-study: replacement worker after {recovery:.1f} s")


def _inline_registered_step(run_dir: Path) -> int:
    """The newest step an inline run registered a checkpoint for (-1: none)."""
    from binarydm.train._checkpoint import checkpoint_step
    from binarydm.train._session import InlineSession

    newest = InlineSession(run_dir, device=None).checkpoint_path() if run_dir.exists() else None
    return -1 if newest is None else checkpoint_step(Path(newest))


def test_killed_inline_trial_is_retried_by_tune_and_resumes(tiny_teacher, tmp_path, monkeypatch):
    """``workers.inline``: the trial's own actor runs the loop, so killing it kills the
    trial; Ray Tune's retry (``trial_retries``) is a new attempt of the same MLflow run that
    resumes from the newest registered checkpoint."""
    monkeypatch.chdir(tmp_path)
    pid_file, hold = tmp_path / "trial.pid", tmp_path / "hold"
    hold.touch()
    plan = {"0": {"pid_file": str(pid_file), "hold_at_step": 20, "hold_file": str(hold)}}
    for key, value in faults_env(plan).items():
        monkeypatch.setenv(key, value)
    timings: dict = {}

    killer = threading.Thread(
        target=_kill_when_registered,
        args=(tmp_path / TRIAL0_RUN_DIR, 20, pid_file, hold, timings),
        kwargs={"registered": _inline_registered_step, "replacement": "a retried trial"},
        daemon=True,
    )
    killer.start()
    inline = ["--set", "workers.inline=true", "--set", "resources.trial_retries=1"]
    result = CliRunner().invoke(app, [LRM_STUDY, *tiny(steps=40), *inline, "--trials", "1"])
    killer.join(timeout=5)
    assert result.exit_code == 0, result.output
    assert "killed_at" in timings, "the trial was never killed"

    client, parents, trials = study_runs(sqlite_uri(tmp_path, "mlflow.db"))
    assert len(parents) == 1 and list(trials) == [0] and len(trials[0]) == 1  # ONE run
    run = trials[0][0]
    assert run.info.status == "FINISHED" and run.data.tags["attempt"] == "2"
    assert_curve_once(client, run.info.run_id, [10, 20, 30, 40])  # resumed at step 20
    assert "fid" in run.data.metrics
    assert optuna_trials(tmp_path)[0].state.name == "COMPLETE"
    recovery = timings["restarted_at"] - timings["killed_at"]
    print(f"\nRECOVERY inline-trial-kill: retried trial running after {recovery:.1f} s")


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_newest_checkpoint_falls_back_to_previous_and_says_so(
    tiny_teacher, workspace, tmp_path
):
    settings = tiny_settings(**{"training.steps": 30, "training.max_failures": 1})
    storage = tmp_path / "ray"
    run_dir = storage / "corrupt"
    pid_file, hold = tmp_path / "worker.pid", tmp_path / "hold"
    hold.touch()
    outcome: dict = {}

    def fit() -> None:
        outcome["result"] = fit_qat(
            settings, name="corrupt", storage_path=storage, teacher_dir=tiny_teacher,
            data_root=workspace["data_root"], cache_dir=workspace["cache_dir"],
            faults=FaultPlan(pid_file=str(pid_file), hold_at_step=20, hold_file=str(hold)),
        )  # fmt: skip

    thread = threading.Thread(target=fit)
    thread.start()
    # Rank 0 holds after reporting step 20, so checkpoints 10 and 20 both exist now.
    wait_for(lambda: registered_step(run_dir) >= 20, 240, "checkpoint 20")
    _corrupt(run_dir / "checkpoint_00000020" / "state.pt")
    killed_at = time.monotonic()
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    hold.unlink()  # the refit passes step 20 again; it must not hold there a second time
    thread.join(timeout=400)
    metrics = final_metrics(outcome["result"])
    assert metrics["step"] == 30 and metrics["fid"] > 0
    assert metrics["resumed_from_step"] == 10  # the previous checkpoint, not step 0
    note = metrics["resume_note"]
    assert "checkpoint_00000020: sha256 mismatch; falling back to the previous one" in note
    assert "resumed from checkpoint_00000010 (step 10)" in note
    # The refit's checkpoints have names of their own: when Ray Train evicts the corrupt
    # step-20 result it deletes that folder, which must not be the refit's step 20.
    kept = sorted(p.name for p in run_dir.iterdir() if p.is_dir())
    assert kept == ["checkpoint_00000030-refit00000010", "checkpoint_final"]
    print(f"\nRECOVERY corrupt-checkpoint: run finished {time.monotonic() - killed_at:.1f} s "
          "after the kill")  # fmt: skip


# -- a study whose trials raise or diverge --------------------------------------------------


@pytest.fixture(scope="module")
def faulty_study(tmp_path_factory, tiny_teacher):
    """Three trials, one retry each: 0 diverges (NaN), 1 runs out of memory on every
    attempt, 2 runs out of memory once; the simulated OOM comes at step 7 of 10."""
    workdir = tmp_path_factory.mktemp("faulty_study")
    always, once = workdir / "oom-always", workdir / "oom-once"
    always.write_text("9")
    once.write_text("1")
    plan = {
        "0": {"nan_at_step": 3},
        "1": {"fail_at_step": 7, "fail_marker": str(always)},
        "2": {"fail_at_step": 7, "fail_marker": str(once)},
    }
    args = [
        LRM_STUDY, *tiny(steps=10, every=5), "--trials", "3",
        "--set", "resources.trial_retries=1",
        "--set", "training.max_failures=0",  # the OOM reaches Tune, not a Train-level restart
    ]  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        for key, value in faults_env(plan).items():
            patch.setenv(key, value)
        started = time.monotonic()
        result = CliRunner().invoke(app, args)
    print(f"\nTIMING faulty study (3 trials, 1 retry): {time.monotonic() - started:.1f} s")
    client, parents, trials = study_runs(sqlite_uri(workdir, "mlflow.db"))
    return {
        "result": result, "workdir": workdir, "client": client, "parents": parents,
        "trials": trials, "optuna": optuna_trials(workdir), "always": always, "once": once,
    }  # fmt: skip


def _one_run(study: dict, trial_id: int):
    runs = study["trials"][trial_id]
    assert len(runs) == 1, f"trial {trial_id} has {len(runs)} MLflow runs"
    return runs[0]


def test_study_continues_past_failed_trials(faulty_study):
    assert faulty_study["result"].exit_code == 0, faulty_study["result"].output
    states = {n: t.state.name for n, t in faulty_study["optuna"].items()}
    assert states == {0: "FAIL", 1: "FAIL", 2: "COMPLETE"}
    statuses = {n: _one_run(faulty_study, n).info.status for n in faulty_study["trials"]}
    assert statuses == {0: "FAILED", 1: "FAILED", 2: "FINISHED"}  # none left RUNNING
    (parent,) = faulty_study["parents"]
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["trials_failed"] == 2
    assert parent.data.metrics["trials_finished"] == 1


def test_nan_loss_stops_the_trial_failed_with_its_reason(faulty_study):
    trial = faulty_study["optuna"][0]
    assert "NonFiniteLossError: non-finite loss (nan) at step 3" in trial.user_attrs["fail_reason"]
    run = _one_run(faulty_study, 0)
    assert run.info.status == "FAILED"
    assert "non-finite loss (nan) at step 3" in run.data.tags["error"]
    assert run.data.tags["attempt"] == "1"  # deterministic: never retried
    assert "fid" not in run.data.metrics  # stopped before its evaluation
    assert faulty_study["client"].get_metric_history(run.info.run_id, "loss") == []


def test_raising_trial_is_failed_with_its_error_after_its_retries(faulty_study):
    trial = faulty_study["optuna"][1]
    reason = trial.user_attrs["fail_reason"]
    assert "trial raised an error (attempt 2)" in reason
    assert "OutOfMemoryError: CUDA out of memory at step 7" in reason
    run = _one_run(faulty_study, 1)
    assert run.info.status == "FAILED"
    assert run.data.tags["attempt"] == "2" and run.data.tags["error_attempt"] == "2"
    assert "CUDA out of memory at step 7" in run.data.tags["error"]
    assert faulty_study["always"].read_text() == "7"  # it failed exactly twice


def test_retried_trial_is_a_new_attempt_of_the_same_run(faulty_study):
    assert faulty_study["optuna"][2].state.name == "COMPLETE"
    assert faulty_study["once"].read_text() == "0"
    run = _one_run(faulty_study, 2)
    assert run.info.status == "FINISHED"
    assert run.data.tags["attempt"] == "2"
    assert run.data.tags["error_attempt"] == "1"  # the first attempt's error stays on record
    assert "CUDA out of memory" in run.data.tags["error"]
    assert run.data.metrics["fid"] > 0
    # Attempt 2 resumed from attempt 1's step-5 checkpoint: step 5 is not logged twice.
    assert_curve_once(faulty_study["client"], run.info.run_id, [5, 10])
