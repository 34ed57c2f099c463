"""Faults of the study's driver: ``bdm-search`` stopped by Ctrl-C, SIGKILLed mid-study then
resumed, and two drivers of the same study started at once on one storage.

Drivers run as real ``bdm-search`` subprocesses. A killed one starts its own local Ray
in its own process group, so killing the group is a whole-machine crash of the study;
the tests prove no Ray process of it survives and check, while it runs, that Ray
listens on 127.0.0.1 only and with token authentication on.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import optuna
import pytest
from fault_support import (
    LRM_STUDY,
    StudyProcess,
    assert_curve_once,
    curve_steps,
    faults_env,
    listening_addresses,
    optuna_trials,
    sqlite_uri,
    study_runs,
    tiny,
    wait_for,
)

from binarydm.search._driver import ORPHAN_REASON
from binarydm.tracking import StudyTracker
from binarydm.tracking._repro import GIT_COMMIT_ENV

LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


def _trial_finished(process: StudyProcess, uri: str, trial_id: int) -> bool:
    _alive(process)
    _, _, trials = study_runs(uri)
    return any(r.info.status == "FINISHED" for r in trials.get(trial_id, []))


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def test_study_cluster_listens_on_loopback_with_token_auth_and_stops_on_ctrl_c(
    tiny_teacher, tmp_path
):
    pid_file, hold = tmp_path / "worker.pid", tmp_path / "hold"
    hold.touch()
    args = [LRM_STUDY, *tiny(steps=10, every=5), "--trials", "1"]
    # The trial holds after step 5 (until Ctrl-C ends it): surely unfinished at the Ctrl-C.
    faults = {"pid_file": str(pid_file), "hold_at_step": 5, "hold_file": str(hold)}
    study = StudyProcess(tmp_path, args, faults_env({"0": faults})).start()
    try:
        # Rank 0 writes its PID once its process group (and TCPStore) is up: all is running.
        wait_for(lambda: _alive(study) and pid_file.exists(), 600, "the trial's first worker")
        ray_pids = study.ray_processes()
        assert ray_pids, "no Ray process found under the study's RAY_TMPDIR"
        addresses = listening_addresses(study.members() + ray_pids)
        assert "127.0.0.1" in addresses or "::ffff:127.0.0.1" in addresses, addresses
        # Except rank 0's torch.distributed TCPStore (the gloo rendezvous), which listens on
        # every interface whatever MASTER_ADDR says: torch has no bind address for it.
        exposed = {o for a, owners in addresses.items() if a not in LOOPBACK for o in owners}
        assert all(owner.endswith(" ray::RayTrainWorker") for owner in exposed), addresses
        (gcs,) = [pid for pid in ray_pids if "gcs_server" in _cmdline(pid)]
        assert _environ(gcs).get("RAY_AUTH_MODE") == "token"
        assert "--node-ip-address=127.0.0.1" in _cmdline(gcs)
        # Ctrl-C, as a terminal sends it: SIGINT to the whole foreground group. Tune's
        # result grid says TERMINATED for the stopped trial; the study is still interrupted.
        os.killpg(study.process.pid, signal.SIGINT)
        code = study.wait(300)
    finally:
        hold.unlink(missing_ok=True)
        survivors = study.kill_group()
    assert survivors == [], f"processes of the killed study survived: {survivors}"
    output = study.output()
    assert code == 130, output
    assert "interrupted: finished trials are saved" in output and "--resume" in output
    assert "Pareto front" not in output  # not summarised as a finished study
    _, parents, trials = study_runs(sqlite_uri(tmp_path, "mlflow.db"))
    assert [p.info.status for p in parents] == ["KILLED"]  # a resume sets it RUNNING again
    assert list(tmp_path.glob("*.lock")) == []  # nothing left beside the stores


def _alive(process: StudyProcess) -> bool:
    if process.process.poll() is not None:
        raise AssertionError(f"bdm-search exited early:\n{process.output()}")
    return True


@pytest.mark.slow
def test_killed_driver_resumes_and_completes_the_budget(tiny_teacher, tmp_path):
    hold = tmp_path / "hold"
    hold.touch()
    args = [LRM_STUDY, *tiny(steps=20), "--trials", "3"]
    # Trial 1 holds after its step-10 checkpoint: it is surely mid-run when the driver dies.
    plan = {"1": {"hold_at_step": 10, "hold_file": str(hold)}}
    # The code changes between the kill and the resume (a `git pull`), as happens.
    env = {**faults_env(plan), GIT_COMMIT_ENV: "commit-before-kill"}
    first = StudyProcess(tmp_path, args, env).start()
    uri = sqlite_uri(tmp_path, "mlflow.db")
    try:
        wait_for(lambda: _trial_finished(first, uri, 0), 900, "trial 0's MLflow run FINISHED")
    finally:
        survivors = first.kill_group()
    assert survivors == [], f"processes of the killed study survived: {survivors}"
    hold.unlink()
    # Trials Optuna handed out just before the kill, which Tune never recorded: orphans.
    # One never ran; the other ran to the end (its MLflow run FINISHED with objectives).
    study = optuna.load_study(study_name="lrm_rank", storage=sqlite_uri(tmp_path, "optuna.db"))
    orphan, orphan_done = study.ask().number, study.ask().number
    tracker = StudyTracker(uri, "lrm_rank", "lrm_rank")
    done_run = tracker.start_attempt(orphan_done)[0]
    tracker.log_metrics(done_run, {"fid": 123.0, "test_loss": 0.5}, step=20)
    tracker.finish_trial(done_run, "FINISHED")

    started = time.monotonic()
    second = StudyProcess(tmp_path, [*args, "--resume"], {GIT_COMMIT_ENV: "commit-after"}).start()
    try:
        assert second.wait(900) == 0, second.output()
    finally:
        leftovers = second.kill_group(settle_s=10)
    print(f"\nRECOVERY driver-kill: resumed study finished in {time.monotonic() - started:.1f} s")
    assert leftovers == []  # a clean exit leaves nothing behind either

    trials = optuna_trials(tmp_path)
    states = {n: t.state.name for n, t in trials.items()}
    assert "RUNNING" not in states.values(), states
    # The budget of 3 Tune trials, plus the orphan that had finished.
    assert sum(s == "COMPLETE" for s in states.values()) == 3 + 1, states
    assert states[orphan] == "FAIL"
    assert trials[orphan_done].values == [123.0, 0.5]
    for trial in trials.values():
        if trial.state.name == "FAIL":  # only orphans fail in this study
            assert trial.user_attrs["fail_reason"] == ORPHAN_REASON

    client, parents, runs = study_runs(uri)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert all(len(found) == 1 for found in runs.values()), runs  # no run duplicated
    assert runs[0][0].data.tags["attempt"] == "1"  # finished before the kill: not rerun
    for number, trial in trials.items():
        if trial.state.name == "COMPLETE":
            run = runs[number][0]
            assert run.info.status == "FINISHED"
            assert trial.values[0] == pytest.approx(run.data.metrics["fid"])
        elif number in runs:
            assert runs[number][0].info.status == "FAILED"
    held = runs[1][0]
    assert held.data.tags["attempt"] == "2"  # continued under its own run, a new attempt
    # Its environment changed, its config did not: the first commit stays the param, the
    # second is on record as the attempt's tag.
    assert held.data.params["code.git_commit"] == "commit-before-kill"
    assert held.data.tags["attempt2.code.git_commit"] == "commit-after"
    assert_curve_once(client, held.info.run_id, [10, 20])  # from its step-10 checkpoint


def test_two_drivers_of_one_study_at_once_leave_consistent_storage(
    tiny_teacher, ray_cluster, tmp_path
):
    address = ray_cluster.get_runtime_context().gcs_address
    # The subject is the shared storage, not Ray Train: inline trials.
    args = [LRM_STUDY, *tiny(steps=10, every=5, inline=True), "--trials", "1",
            "--address", address]  # fmt: skip
    drivers = [StudyProcess(tmp_path, args, own_ray=False).start() for _ in range(2)]
    codes = [driver.wait(600) for driver in drivers]
    outputs = [driver.output() for driver in drivers]
    # Both finish, or the later one is refused in one line (its rival already saved state).
    for code, output in zip(codes, outputs, strict=True):
        assert code == 0 or (code == 2 and "pass --resume to continue it" in output), output
    assert 0 in codes

    trials = optuna_trials(tmp_path)  # the storage loads
    assert [t.state.name for t in trials.values()] == ["COMPLETE"] * codes.count(0)
    _, parents, runs = study_runs(sqlite_uri(tmp_path, "mlflow.db"))
    assert len(parents) == 1  # one parent run per study name
    assert parents[0].info.status == "FINISHED"  # a refused driver did not reopen it
    assert sorted(runs) == sorted(trials)
    assert all(len(found) == 1 and found[0].info.status == "FINISHED" for found in runs.values())
    print(f"\nOUTCOME two drivers: exit codes {codes}")


def _killed_with_trial_1_mid_run(workdir: Path, hold: Path) -> tuple[list[str], str]:
    """A 3-trial inline study in ``workdir`` killed (its whole process group) once trial 0
    finished and trial 1, held there, wrote its step-10 checkpoint; (its args, MLflow URI)."""
    hold.touch()
    args = [LRM_STUDY, *tiny(steps=20, inline=True), "--trials", "3"]
    plan = {"1": {"hold_at_step": 10, "hold_file": str(hold)}}
    first = StudyProcess(workdir, args, faults_env(plan)).start()
    uri = sqlite_uri(workdir, "mlflow.db")
    try:
        wait_for(lambda: _trial_finished(first, uri, 0), 900, "trial 0's MLflow run FINISHED")
        wait_for(
            lambda: list(workdir.glob("ray_results/trials/*trial0001*/checkpoint_00000010")),
            300,
            "trial 1's step-10 checkpoint",
        )
    finally:
        assert first.kill_group() == []
    hold.unlink()
    return args, uri


@pytest.mark.slow
def test_study_resumes_from_its_stores_without_the_checkpoints(tiny_teacher, tmp_path):
    # A GPU session's end (benchmarks/cifar10_w1_session.sh): the machine goes away and only
    # the stores come back (MLflow, Optuna, Ray Tune's experiment), without the trials'
    # checkpoint folders (a ddpm-cifar10 one is about 570 MB); the next session unpacks
    # them at the same path and resumes. (The archive round trip itself is byte for byte.)
    import shutil

    args, uri = _killed_with_trial_1_mid_run(tmp_path, tmp_path / "hold")
    trials_dir = tmp_path / "ray_results" / "trials"
    checkpoints = list(trials_dir.glob("*/checkpoint_*"))  # what the session leaves behind
    assert any("trial0001" in str(c) for c in checkpoints)
    for folder in checkpoints:
        shutil.rmtree(folder)

    second = StudyProcess(tmp_path, [*args, "--resume"]).start()
    try:
        assert second.wait(900) == 0, second.output()
    finally:
        assert second.kill_group(settle_s=10) == []
    states = {n: t.state.name for n, t in optuna_trials(tmp_path).items()}
    assert sum(s == "COMPLETE" for s in states.values()) == 3, states
    client, parents, runs = study_runs(uri)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert all(len(found) == 1 for found in runs.values()), runs  # no run duplicated
    assert runs[0][0].data.tags["attempt"] == "1"  # finished before: not rerun
    held = runs[1][0]
    # No checkpoint came back: trained again from step 0, a new attempt of the same run.
    assert held.info.status == "FINISHED" and held.data.tags["attempt"] == "2"
    assert held.data.metrics.get("resumed_from_step", 0) == 0
    assert curve_steps(client, held.info.run_id, "loss").count(10) == 2  # once per attempt


@pytest.mark.slow
def test_study_moves_to_another_machine_as_its_run_archive_and_resumes(tiny_teacher, tmp_path):
    # A GPU machine that goes away with its disk: only the committed run archive (runs.json,
    # optuna.jsonl) is left. Another machine imports it and resumes: no Tune experiment,
    # so the lost trial continues under its own Optuna trial and run, and the budget
    # counts what already ended.
    import shutil

    from typer.testing import CliRunner

    from binarydm.cli import app

    first_dir, second_dir, archive = tmp_path / "gpu", tmp_path / "cpu", tmp_path / "archive"
    first_dir.mkdir()
    second_dir.mkdir()
    args, uri = _killed_with_trial_1_mid_run(first_dir, tmp_path / "hold")
    exported = CliRunner().invoke(
        app, ["export", "lrm_rank", "--out", str(archive), "--tracking-uri", uri,
              "--optuna-storage", sqlite_uri(first_dir, "optuna.db")],
    )  # fmt: skip
    assert exported.exit_code == 0, exported.output
    before = {n: t.state.name for n, t in optuna_trials(first_dir).items()}
    assert before[0] == "COMPLETE" and before[1] == "RUNNING", before
    shutil.rmtree(first_dir)  # the machine, its stores and checkpoints are gone

    second_uri = sqlite_uri(second_dir, "mlflow.db")
    imported = CliRunner().invoke(
        app, ["import", str(archive), "--tracking-uri", second_uri, "--artifact-location",
              str(second_dir / "mlartifacts"), "--optuna-storage",
              sqlite_uri(second_dir, "optuna.db")],
    )  # fmt: skip
    assert imported.exit_code == 0, imported.output
    second = StudyProcess(second_dir, [*args, "--resume"]).start()
    try:
        assert second.wait(900) == 0, second.output()
    finally:
        assert second.kill_group(settle_s=10) == []

    trials = optuna_trials(second_dir)
    assert sorted(trials) == [0, 1, 2]  # the budget of 3, not 3 more
    assert all(t.state.name == "COMPLETE" for t in trials.values())
    client, parents, runs = study_runs(second_uri)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert all(len(found) == 1 for found in runs.values()), runs  # no run duplicated
    assert runs[0][0].data.tags["attempt"] == "1"  # finished before the loss: not rerun
    held = runs[1][0]
    assert "bdm.archived_run_id" in held.data.tags  # the imported run, continued
    assert held.info.status == "FINISHED" and held.data.tags["attempt"] == "2"
    assert trials[1].user_attrs["mlflow_run_id"] == held.info.run_id
    assert trials[1].values[0] == pytest.approx(held.data.metrics["fid"])
    assert curve_steps(client, held.info.run_id, "loss").count(10) == 2  # once per attempt
