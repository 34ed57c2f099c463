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
    assert result["mean_pct"] == pytest.approx(97.0, abs=0.05)
    all_five = next(r for r in result["by_phase"] if (r["training"], r["evaluating"]) == (5, 0))
    assert all_five["seconds"] == pytest.approx(872, abs=1)
    assert all_five["mean_pct"] == pytest.approx(98.5, abs=0.05)
    assert 2.0 <= result["spacing_s"] < 2.2  # the 2-s period plus nvidia-smi's own time
    assert result["max_memory_gib"] == pytest.approx(71.5, abs=0.05)
    assert "| 5 | 0 | 872 | 98.5 |" in tool.markdown(result)


def test_each_gpu_of_a_recording_is_summarised_on_its_own(tool, tmp_path):
    # A two-GPU host's recording: a row per GPU each time. An idle second card changes
    # neither the first card's numbers nor the spacing.
    data = json.loads(RECORDING.read_text())
    idle = [dict(s, gpu=1, util_pct=0.0, memory_mib=0.0) for s in data["samples"]]
    both = tmp_path / "util.json"
    both.write_text(json.dumps(dict(data, samples=data["samples"] + idle)))
    alone = tool.summarise(RECORDING, ARCHIVE)
    first = tool.summarise(both, ARCHIVE, gpu=0)
    assert first == alone
    second = tool.summarise(both, ARCHIVE, gpu=1)
    assert second["mean_pct"] == 0 and second["spacing_s"] == alone["spacing_s"]
    with pytest.raises(SystemExit, match="of GPU 2"):
        tool.summarise(both, ARCHIVE, gpu=2)


def test_a_recording_without_samples_is_refused(tool, tmp_path):
    empty = tmp_path / "util.json"
    empty.write_text(json.dumps({"period_s": 2.0, "samples": []}))
    with pytest.raises(SystemExit, match="0 sample"):
        tool.summarise(empty, ARCHIVE)
