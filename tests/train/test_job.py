"""The typed worker job: it crosses Ray's boundary intact, its fault plan is strict, and a
diverged run is told apart from other failures by type."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest
import torch
from bdm_support import tiny_settings

from binarydm.train._loop import FAULT_KEYS
from binarydm.train._runner import DivergedTrialError, TrialError, final_metrics, worker_job
from binarydm.train.job import JOB_KEY, FaultPlan, WorkerJob


def test_worker_job_round_trips_through_train_loop_config_and_pickle(tmp_path):
    job = worker_job(
        tiny_settings(), "qat", tmp_path / "teacher", tmp_path, None,
        faults=FaultPlan(nan_at_step=3), evaluate=False,
    )  # fmt: skip
    assert job.teacher_dir == str((tmp_path / "teacher").resolve()) and job.cache_dir is None
    config = job.train_loop_config()
    assert list(config) == [JOB_KEY]  # Ray Train's train_loop_config must be a dict
    again = WorkerJob.from_train_loop_config(pickle.loads(pickle.dumps(config)))
    assert again == job and again.settings == tiny_settings()
    with pytest.raises(TypeError, match="train_loop_config"):
        WorkerJob.from_train_loop_config({JOB_KEY: {"settings": {}}})
    with pytest.raises(ValueError, match="mode='eval' is invalid"):
        WorkerJob(tiny_settings(), "eval")


def test_fault_plan_keys_and_what_each_injects(tmp_path):
    assert FaultPlan.keys() == FAULT_KEYS and "nan_at_step" in FAULT_KEYS
    with pytest.raises(ValueError, match="fault key 'nan_step' is invalid"):
        FaultPlan.from_mapping({"nan_step": 3})
    assert FaultPlan.from_mapping(None) == FaultPlan()
    noise = torch.ones(2)
    plan = FaultPlan(nan_at_step=3)
    assert plan.poison(2, noise) is noise and plan.poison(3, noise).isnan().all()
    marker = tmp_path / "failures"
    marker.write_text("1")
    failing = FaultPlan(fail_at_step=5, fail_marker=str(marker))
    failing.before_step(5, rank=1)  # rank 0 only
    with pytest.raises(torch.OutOfMemoryError, match="at step 5"):
        failing.before_step(5, rank=0)
    failing.before_step(5, rank=0)  # the counter is spent
    assert marker.read_text() == "0"
    FaultPlan(pid_file=str(tmp_path / "pid")).on_start(rank=0)
    assert int((tmp_path / "pid").read_text()) > 0


def test_a_diverged_run_is_a_diverged_trial_error():
    diverged = {"error": "NonFiniteLossError: non-finite loss (nan) at step 3", "diverged": True}
    with pytest.raises(DivergedTrialError, match="non-finite loss"):
        final_metrics(SimpleNamespace(error=None, metrics=diverged))
    with pytest.raises(TrialError) as info:
        final_metrics(SimpleNamespace(error=None, metrics={"error": "something else"}))
    assert not isinstance(info.value, DivergedTrialError)
