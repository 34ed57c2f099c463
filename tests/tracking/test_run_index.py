"""benchmarks/run_index.py: the committed index of the run archives is what the archives
give, and links the reports' numbers to their runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from bdm_support import load_benchmark

ROOT = Path(__file__).resolve().parents[2]
RUNS = ROOT / "benchmarks" / "results" / "runs"
INDEX = RUNS / "README.md"


@pytest.fixture(scope="module")
def tool():
    return load_benchmark("run_index")


def _section(text: str, archive: str) -> str:
    start = text.index(f"## [{archive}]")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def _rows(section: str) -> dict[str, dict[str, str]]:
    """The section's table as {run name: {column: cell}}."""
    table = [line for line in section.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    rows = {}
    for line in table[2:]:
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
        rows[cells["run"].strip("`")] = cells
    return rows


def test_the_committed_index_is_current(tool):
    # Fails when an archive is added or re-exported without regenerating the index.
    assert tool.main([str(RUNS), "--out", str(INDEX), "--check"]) == 0


def test_the_index_links_each_reported_number_to_its_run(tool):
    text = tool.render(RUNS)
    archives = sorted(p.name for p in RUNS.iterdir() if (p / "runs.json").is_file())
    assert re.findall(r"^## \[([^\]]+)\]", text, flags=re.M) == archives
    stage3 = _section(text, "cifar10_stage3")
    assert "`optuna.jsonl`" in stage3.splitlines()[0]
    rows = _rows(stage3)
    # cifar10_w1.md's stage-3 table: trial 2 at 26.48 on 4000 DDIM-100 compiled samples.
    trial2 = rows["trial-0002"]
    assert (trial2["status"], trial2["A bits"], trial2["FID"]) == ("FINISHED", "4", "26.48")
    assert (trial2["samples"], trial2["steps"], trial2["dims"]) == ("4000", "100", "2048")
    assert (trial2["reference"], trial2["sampler"]) == ("cifar10/test/32px", "default")
    # Continued in session 12 from the archive (RUNNING until then): the 3-basis front point.
    trial8 = rows["trial-0008"]
    assert (trial8["status"], trial8["weight_bits"], trial8["FID"]) == (
        "FINISHED",
        "1.751",
        "26.97",
    )
    # A run the machine lost mid-training: its state, and no FID shown for it.
    lost = _rows(_section(text, "compiled_s1_partial"))["trial-0003"]
    assert (lost["status"], lost["FID"], lost["row"]) == ("RUNNING", "-", "binarydm_a8")
    fp = _rows(_section(text, "cifar10_w1a4_s0"))["fp-reference"]
    assert fp["role"] == "reference" and fp["sampler"] == "absent"  # stage 1: eager
    assert (fp["weight_bits"], fp["FID"]) == ("32.000", "20.35")
