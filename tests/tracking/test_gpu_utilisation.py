"""benchmarks/gpu_utilisation.py on a committed recording: stage 3's session-12 wave (five
trials on one H100, nvidia-smi every 2 s), read against the study's run archive."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bdm_support import load_benchmark

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
RECORDING = RESULTS / "gpu_utilisation" / "cifar10_stage3_session12.json"
ARCHIVE = RESULTS / "runs" / "cifar10_stage3"


@pytest.fixture(scope="module")
def tool():
    return load_benchmark("gpu_utilisation")


def test_the_recording_is_read_against_the_trials_that_ran_during_it(tool):
    result = tool.summarise(RECORDING, ARCHIVE)
    samples = json.loads(RECORDING.read_text())["samples"]
    assert result["samples"] == len(samples) == 616
    # The archive holds session 11's trials too: only the five of this recording count.
    assert result["trials"] == [f"trial-000{i}" for i in range(5, 10)]
    assert 1200 < result["window_s"] < result["recorded_s"]
    assert 590 < result["window_samples"] < len(samples)  # before and after: not counted
    # Every in-window sample lands in one (training, evaluating) group.
    spacing = result["spacing_s"]
    assert sum(r["seconds"] for r in result["by_phase"]) == pytest.approx(
        result["window_samples"] * spacing
    )
    weighted = sum(r["mean_pct"] * r["seconds"] for r in result["by_phase"]) / sum(
        r["seconds"] for r in result["by_phase"]
    )
    assert weighted == pytest.approx(result["mean_pct"])
    all_five = next(r for r in result["by_phase"] if (r["training"], r["evaluating"]) == (5, 0))
    assert all_five["seconds"] > 800 and all_five["mean_pct"] > 95
    assert 2.0 <= spacing < 2.2  # the 2-s period plus nvidia-smi's own time
    assert "| 5 | 0 |" in tool.markdown(result)


def test_a_recording_without_samples_is_refused(tool, tmp_path):
    empty = tmp_path / "util.json"
    empty.write_text(json.dumps({"period_s": 2.0, "samples": []}))
    with pytest.raises(SystemExit, match="0 sample"):
        tool.summarise(empty, ARCHIVE)
