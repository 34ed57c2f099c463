"""benchmarks/trials_per_gpu_hour.py on committed GPU run archives: trials per GPU-hour and
each trial's wall-time split, pinned to the archived runs' own times and metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bdm_support import load_benchmark

ROOT = Path(__file__).resolve().parents[2]
RUNS = ROOT / "benchmarks" / "results" / "runs"


@pytest.fixture(scope="module")
def tool():
    return load_benchmark("trials_per_gpu_hour")


def _archive(name: str) -> dict:
    return json.loads((RUNS / name / "runs.json").read_text())


def test_stage2_study_rate_is_its_trials_over_its_window(tool):
    archive = _archive("cifar10_stage2_s0a")
    summary = tool.summarise([archive], gpus=1.0)
    parent = next(r for r in archive["runs"] if r["run_name"] == "cifar10_stage2_s0a")
    trials = [r for r in archive["runs"] if r["run_name"].startswith("trial-")]
    window = (max(r["end_time"] for r in trials) - parent["start_time"]) / 1000
    assert summary["trials_finished"] == 2
    assert summary["window_s"] == pytest.approx(window, abs=0.1)
    assert 549 < window < 552  # the archive's times: study start to the last trial's end
    assert summary["trials_per_gpu_hour"] == pytest.approx(2 * 3600 / window, abs=0.01)
    # Two GPUs for the same study: half the rate per GPU.
    two = tool.summarise([archive], gpus=2.0)
    assert two["trials_per_gpu_hour"] == pytest.approx(3600 / window, abs=0.01)
    assert summary["one_wave"] is True
    assert summary["budget"] == [(1500, 128, 4000, 100, 2048)]


def test_a_trials_parts_add_up_to_its_wall_time(tool):
    summary = tool.summarise([_archive("cifar10_stage2_s0a")], gpus=1.0)
    by_trial = {t["trial"]: t for t in summary["trials"]}
    split = by_trial["trial-0001"]["split_s"]  # baseline W1A8, seed 0
    assert sum(split[k] for k in tool.PARTS) == pytest.approx(split["wall"], abs=0.05)
    # The evaluation is its sampling, its FID and the rest (test loss, OPs, packing).
    assert split["sample"] + split["fid"] + split["eval_other"] == pytest.approx(
        split["eval"], abs=0.05
    )
    assert split["train"] == pytest.approx(343.35, abs=0.01)
    assert split["sample"] == pytest.approx(150.38, abs=0.01)
    assert 20 < split["actor_start"] < 25  # process start and imports before the trainable
    shares = summary["share_of_wall"]
    assert sum(shares[k] for k in tool.PARTS) == pytest.approx(1.0, abs=0.005)


def test_an_archive_without_timing_metrics_leaves_those_parts_unknown(tool):
    # The first session's seed-1 study predates the timing/ metrics.
    summary = tool.summarise([_archive("cifar10_w1a4_s1")], gpus=1.0)
    split = summary["trials"][0]["split_s"]
    assert split["sample"] is None and split["actor_start"] is None
    assert split["eval"] is not None and split["train"] > 0
    text = tool.markdown(summary)
    assert "| - |" in text and "sample " not in text.split("Mean share")[1]
    # Every row of the table has its header's columns (an "eval" cell once had none).
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in table}) == 1
    assert table[0].split(" | ")[8] == "eval"


def test_concurrent_studies_share_one_window(tool):
    both = tool.summarise([_archive("cifar10_w1a4_cl_s0"), _archive("cifar10_w1a4_cl_s1")], 1.0)
    alone = tool.summarise([_archive("cifar10_w1a4_cl_s0")], 1.0)
    assert both["trials_finished"] == 3 and alone["trials_finished"] == 2
    # The seed-1 study ran inside the seed-0 study's window on the same card.
    assert both["window_s"] == pytest.approx(alone["window_s"], abs=1.0)
    assert both["trials_per_gpu_hour"] == pytest.approx(1.5 * alone["trials_per_gpu_hour"], 0.01)


def test_a_study_resumed_in_a_later_session_counts_each_sessions_window(tool):
    # Stage 3: trials 0-4 finished in session 11; trials 5-9, cut off there, continued
    # in session 12 (two days later) under their first runs. The days between do not
    # count, and a continued trial is timed from its last attempt, not its run's start.
    archive = _archive("cifar10_stage3")
    summary = tool.summarise([archive], gpus=1.0)
    first, second = summary["sessions"]
    assert sorted(first["trials"]) == [f"trial-000{i}" for i in range(5)]
    assert sorted(second["trials"]) == [f"trial-000{i}" for i in range(5, 10)]
    assert second["start_unix"] - first["end_unix"] > 86400
    parent = next(r for r in archive["runs"] if r["run_name"] == "cifar10_stage3")
    assert first["start_unix"] == pytest.approx(parent["start_time"] / 1000, abs=1.0)
    runs = {r["run_name"]: r for r in archive["runs"]}
    ends = [runs[name]["end_time"] / 1000 for name in second["trials"]]
    assert second["end_unix"] == pytest.approx(max(ends), abs=0.01)
    assert summary["window_s"] == pytest.approx(first["window_s"] + second["window_s"], abs=0.2)
    assert 1300 < first["window_s"] < 1320 and 1200 < second["window_s"] < 1300
    assert summary["trials_per_gpu_hour"] == pytest.approx(
        10 * 3600 / summary["window_s"], abs=0.01
    )
    walls = {t["trial"]: t["split_s"] for t in summary["trials"]}
    # trial-0006: handed to Tune at the session's hand-off, its run ended 1236.2 s later.
    assert walls["trial-0006"]["wall"] == pytest.approx(1236.2, abs=0.1)
    assert walls["trial-0006"]["actor_start"] == pytest.approx(17.0, abs=0.1)
    for split in walls.values():
        assert 900 < split["wall"] < 1400
        assert 10 < split["actor_start"] < 30  # process start and imports, each session
    assert summary["one_wave"] is False  # two waves: the rates are not summed
    assert first["one_wave"] and second["one_wave"]


def _shifted(archive: dict, names: set[str], seconds: float) -> dict:
    """A copy of ``archive`` with the runs ``names`` moved ``seconds`` in time."""
    import copy

    moved = copy.deepcopy(archive)
    for run in moved["runs"]:
        if run["run_name"] in names:
            run["start_time"] += seconds * 1000
            run["end_time"] += seconds * 1000
            for key in ("timing/actor_created_unix", "timing/trial_entered_unix"):
                if key in run["metrics"]:
                    run["metrics"][key] += seconds
    return moved


def test_trials_one_after_another_in_one_session_share_its_window(tool):
    # Session 12's trials moved to start 5 s after session 11's last ended (as a slot's
    # next trial would): one session, whose window holds the pause, not two.
    archive = _archive("cifar10_stage3")
    summary = tool.summarise([archive], gpus=1.0)
    first, second = summary["sessions"]
    late = {f"trial-000{i}" for i in range(5, 10)}
    starts = {t["trial"]: t["start_unix"] for t in summary["trials"]}
    shift = first["end_unix"] + 5 - min(starts[name] for name in late)
    merged = tool.summarise([_shifted(archive, late, shift)], gpus=1.0)
    (only,) = merged["sessions"]
    assert only["window_s"] == pytest.approx(first["window_s"] + 5 + second["window_s"], abs=0.5)
    assert merged["trials_per_gpu_hour"] < summary["trials_per_gpu_hour"]


def test_a_later_attempt_without_its_start_time_is_refused(tool):
    # Without trial_entered_unix a continued trial would be timed from its first attempt,
    # two days earlier: refused rather than reported as a days-long wall.
    import copy

    archive = copy.deepcopy(_archive("cifar10_stage3"))
    run = next(r for r in archive["runs"] if r["run_name"] == "trial-0005")
    assert run["tags"]["attempt"] == "2"
    del run["metrics"]["timing/trial_entered_unix"]
    with pytest.raises(SystemExit, match="trial-0005: attempt 2 without"):
        tool.summarise([archive], gpus=1.0)


def test_a_folder_that_is_not_an_archive_is_refused(tool, tmp_path):
    with pytest.raises(SystemExit, match="not a `bdm-search export` archive"):
        tool.load_archive(tmp_path)
