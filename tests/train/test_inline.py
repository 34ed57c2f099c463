"""Inline one-worker runs (``workers.inline``): checkpoint persistence and retention, the
same training as a Ray Train fit, retries from the newest checkpoint, bad settings."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from bdm_support import fit_tiny, tiny_settings

from binarydm._typed import ConfigError
from binarydm.train._checkpoint import save_state
from binarydm.train._runner import TrialError, final_metrics
from binarydm.train._session import INDEX_FILE, InlineSession


class Recorder:
    """A Ray Train user callback that keeps what it saw."""

    def __init__(self) -> None:
        self.reports: list[tuple[dict, str | None]] = []

    def after_report(self, run_context, metrics, checkpoint) -> None:
        self.reports.append((metrics[0], None if checkpoint is None else checkpoint.path))


def _checkpoint(tmp_path: Path, step: int) -> Path:
    source = tmp_path / f"src{step}"
    save_state(source, {"step": step, "w": torch.full((3,), float(step))}, step=step)
    return source


def test_session_persists_registers_and_evicts_like_ray_train(tmp_path):
    seen = []
    session = InlineSession(
        tmp_path / "run", torch.device("cpu"), keep=2, on_report=lambda m, p: seen.append((m, p))
    )
    assert session.checkpoint_path() is None and (session.rank, session.world_size) == (0, 1)
    for step in (5, 10, 15):
        session.report({"step": step}, str(_checkpoint(tmp_path, step)), f"checkpoint_{step:08d}")
    session.report({"step": 16}, None, None)  # a curve point: nothing persisted
    run = tmp_path / "run"
    assert json.loads((run / INDEX_FILE).read_text()) == [
        "checkpoint_00000010",
        "checkpoint_00000015",
    ]
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == [
        "checkpoint_00000010",
        "checkpoint_00000015",
    ]  # the oldest evicted, no staging folder left behind
    assert session.checkpoint_path() == str(run / "checkpoint_00000015")
    assert torch.load(run / "checkpoint_00000015" / "state.pt")["w"].tolist() == [15.0] * 3
    assert [m["step"] for m, _ in seen] == [5, 10, 15, 16]
    assert seen[-1][1] is None and seen[-2][1] == str(run / "checkpoint_00000015")
    assert session.last_metrics == {"step": 16}
    # A new session on the same folder (a retried trial) resumes from the newest one.
    again = InlineSession(run, torch.device("cpu"), keep=2)
    assert again.checkpoint_path() == str(run / "checkpoint_00000015")


def test_checkpoint_written_in_its_staging_folder_is_moved_not_copied(tmp_path):
    session = InlineSession(tmp_path / "run", torch.device("cpu"), keep=2)
    with session.checkpoint_dir() as staging:
        save_state(staging, {"step": 7}, step=7)
        inode = os.stat(Path(staging) / "state.pt").st_ino
        session.report({"step": 7}, staging, "checkpoint_00000007")
        assert not Path(staging).exists()
    target = tmp_path / "run" / "checkpoint_00000007" / "state.pt"
    assert os.stat(target).st_ino == inode  # renamed into place: the same file
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted(
        ["checkpoint_00000007", INDEX_FILE]
    )
    with session.checkpoint_dir() as staging:  # not reported: removed on exit
        Path(staging, "partial").write_text("x")
    assert not Path(staging).exists()


def test_unregistered_folder_is_not_a_resume_point(tmp_path):
    session = InlineSession(tmp_path, torch.device("cpu"), keep=3)
    session.report({"step": 5}, str(_checkpoint(tmp_path, 5)), "checkpoint_00000005")
    # A copy a killed process left half-way: present on disk, never registered.
    (tmp_path / "checkpoint_00000010").mkdir()
    assert session.checkpoint_path() == str(tmp_path / "checkpoint_00000005")


def test_checkpoint_is_registered_only_after_its_report_was_taken(tmp_path):
    """A trial killed while its report is on the way (the curve point, Tune's report)
    resumes from the checkpoint before, so no step's metrics are skipped on resume."""
    newest_while_reporting = []

    def killed_while_reporting(metrics, path):
        newest_while_reporting.append(InlineSession(tmp_path, None).checkpoint_path())
        if metrics["step"] == 10:
            raise KeyboardInterrupt("killed mid-report")

    session = InlineSession(tmp_path, torch.device("cpu"), on_report=killed_while_reporting)
    session.report({"step": 5}, str(_checkpoint(tmp_path, 5)), "checkpoint_00000005")
    with pytest.raises(KeyboardInterrupt):
        session.report({"step": 10}, str(_checkpoint(tmp_path, 10)), "checkpoint_00000010")
    first = str(tmp_path / "checkpoint_00000005")
    assert newest_while_reporting == [None, first]  # not yet registered while reporting
    assert InlineSession(tmp_path, None).checkpoint_path() == first  # the retry's resume point
    assert session.last_checkpoint == first


def _settings(**overrides):
    values = {
        "training.steps": 12,
        "training.checkpoint_every": 6,
        "training.log_every": 3,
        **overrides,
    }
    return tiny_settings(**values)


def test_inline_run_trains_like_the_ray_train_fit(tiny_teacher, workspace):
    recorder = Recorder()
    # A Ray worker runs with one intra-op thread; so does this run: other thread counts
    # change float sums, which sign flips amplify (1 vs 2 threads: 0.5% in the loss).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        inline = fit_tiny(
            _settings(**{"workers.inline": True}), "inline-eq", workspace, tiny_teacher, [recorder]
        )
    finally:
        torch.set_num_threads(threads)
    ray_fit = fit_tiny(_settings(), "ray-eq", workspace, tiny_teacher)
    assert inline.error is None and ray_fit.error is None
    metrics, reference = final_metrics(inline), final_metrics(ray_fit)
    # Same data order, noise, initialisation and thread count: the same training, to float
    # noise.
    for key in ("loss", "loss_noise", "loss_lrm", "fid", "test_loss", "size_mib", "bops_g"):
        assert metrics[key] == pytest.approx(reference[key], rel=2e-3), key
    assert metrics["step"] == 12 and metrics["resumed_from_step"] == 0
    run = Path(inline.path)
    assert run == Path(workspace["storage"]) / "inline-eq"
    assert json.loads((run / INDEX_FILE).read_text()) == ["checkpoint_00000012", "checkpoint_final"]
    assert inline.checkpoint.path == str(run / "checkpoint_final")
    assert {"samples.png", "model.bdm", "state.pt"} <= {
        p.name for p in run.glob("checkpoint_final/*")
    }
    # The final checkpoint links the last step's state instead of saving it again.
    final_state, step_state = (
        run / "checkpoint_final/state.pt",
        run / "checkpoint_00000012/state.pt",
    )
    assert final_state.stat().st_ino == step_state.stat().st_ino
    # Set-up and checkpoint time are reported, in parts that fit inside the set-up.
    for result in (metrics, reference):
        parts = [
            result[k]
            for k in (
                "timing/setup_device_s",
                "timing/setup_data_s",
                "timing/setup_build_s",
                "timing/setup_lrm_s",
            )
        ]
        assert all(p >= 0 for p in parts) and sum(parts) <= result["timing/setup_s"]
        assert 0 < result["timing/checkpoint_s"] < result["train_s"] + result["eval_s"]
    steps = [m.get("step") for m, _ in recorder.reports]
    assert steps == [3, 6, 9, 12, 12] and recorder.reports[-1][0]["final"] is True
    assert recorder.reports[1][1] == str(run / "checkpoint_00000006")


def test_inline_failure_is_retried_from_the_newest_checkpoint(tiny_teacher, workspace, tmp_path):
    marker = tmp_path / "failures"
    marker.write_text("1")
    result = fit_tiny(
        _settings(**{"workers.inline": True}),
        "inline-retry",
        workspace,
        tiny_teacher,
        evaluate=False,
        fail_at_step=8,
        fail_marker=str(marker),
    )
    assert result.error is None and marker.read_text() == "0"
    assert result.metrics["step"] == 12 and result.metrics["final"] is True
    assert result.metrics["resumed_from_step"] == 6  # steps 6-7 trained again, not 0-7


def test_inline_failure_past_max_failures_is_the_trial_error(tiny_teacher, workspace, tmp_path):
    marker = tmp_path / "failures"
    marker.write_text("5")
    settings = _settings(**{"workers.inline": True, "training.max_failures": 1})
    result = fit_tiny(
        settings,
        "inline-fail",
        workspace,
        tiny_teacher,
        evaluate=False,
        fail_at_step=8,
        fail_marker=str(marker),
    )
    assert isinstance(result.error, torch.OutOfMemoryError)
    assert marker.read_text() == "3"  # the first attempt and one retry
    with pytest.raises(TrialError, match="out of memory at step 8"):
        final_metrics(result)


def test_inline_needs_one_worker():
    with pytest.raises(ConfigError, match=r"workers.inline=True is invalid"):
        tiny_settings(**{"workers.inline": True, "workers.num_workers": 2})
