"""benchmarks/front_gap.py: a searched front's best FID at a recipe's size and OPs, on the
committed stage-1 run archives (issue 17's stage-3 comparison), pinned to their metrics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from bdm_support import load_benchmark

ROOT = Path(__file__).resolve().parents[2]
RUNS = ROOT / "benchmarks" / "results" / "runs"


@pytest.fixture(scope="module")
def tool():
    return load_benchmark("front_gap")


def _fid(archive: str, run_name: str) -> float:
    runs = json.loads((RUNS / archive / "runs.json").read_text())["runs"]
    return next(r for r in runs if r["run_name"] == run_name)["metrics"]["fid"]


def test_gap_is_the_best_no_larger_run_against_the_recipes_seed_mean(tool):
    # The constant-lr BinaryDM v5 row over its two seeds (cl_s0, s1b) against the studies
    # s0 (cosine lr: baseline, LMB kept, v5) and s1b (LMB kept, and the recipe's seed 1,
    # which is no candidate of its own comparison): the 1-bit runs share the recipe's size
    # and OPs; the 1.375-bit LMB runs are larger, so no candidates, however good their FID.
    result = tool.compare(
        [RUNS / "cifar10_w1a4_s0", RUNS / "cifar10_w1a4_s1b"],
        [f"{RUNS / 'cifar10_w1a4_cl_s0'}:row=binarydm_constlr",
         f"{RUNS / 'cifar10_w1a4_s1b'}:row=binarydm_constlr"],
        ["size_mib", "ops_g"],
        0.10,
    )  # fmt: skip
    recipe_fids = [_fid(name, "trial-0000") for name in ("cifar10_w1a4_cl_s0", "cifar10_w1a4_s1b")]
    recipe = result["recipe"]
    assert recipe["fid"] == pytest.approx(sum(recipe_fids) / 2)
    assert recipe["size_mib"] == pytest.approx(5.7988, abs=1e-4)
    assert result["front_runs"] == 4  # s0: three trials (not its FP reference); s1b: LMB
    baseline = _fid("cifar10_w1a4_s0", "trial-0002")
    for row in result["gaps"]:
        assert row["candidates"] == 2  # s0's baseline and v5
        assert row["best"]["run"] == "trial-0002" and row["best"]["fid"] == baseline
        assert row["gap"] == pytest.approx((recipe["fid"] - baseline) / recipe["fid"])
        assert row["meets_goal"] is (row["gap"] >= 0.10)
    assert 0 < result["gaps"][0]["gap"] < 0.10  # 54.40 against about 57: a few percent


def test_a_front_worse_than_the_recipe_gives_a_negative_gap(tool):
    # s1b's front (LMB kept, 7.43 MiB; v5 at a constant lr, 5.80 MiB) against s0's
    # baseline (5.80 MiB): only the v5 run is no larger, and its FID is worse.
    result = tool.compare(
        [RUNS / "cifar10_w1a4_s1b"], [f"{RUNS / 'cifar10_w1a4_s0'}:row=baseline"], ["size_mib"], 0.1
    )
    (row,) = result["gaps"]
    baseline, v5 = _fid("cifar10_w1a4_s0", "trial-0002"), _fid("cifar10_w1a4_s1b", "trial-0000")
    assert row["candidates"] == 1 and row["best"]["run"] == "trial-0000"
    assert row["gap"] == pytest.approx((baseline - v5) / baseline)
    assert row["gap"] < 0 and row["meets_goal"] is False
    lmb_front = tool.compare(
        [RUNS / "cifar10_w1a4_s0"], [f"{RUNS / 'cifar10_w1a4_s0'}:row=lmb"], ["size_mib"], 0.1
    )
    # Against the 1.375-bit LMB run: the two 1-bit runs are smaller, the recipe's own run
    # is no candidate, and the best of the others (the baseline) is worse.
    (lmb_row,) = lmb_front["gaps"]
    lmb = _fid("cifar10_w1a4_s0", "trial-0000")
    assert lmb_row["candidates"] == 2 and lmb_row["best"]["run"] == "trial-0002"
    assert lmb_row["gap"] == pytest.approx((lmb - baseline) / lmb) and lmb_row["gap"] < 0
    smaller_than_all = dict(result["recipe"], size_mib=1.0)
    empty = tool.gap_at([], smaller_than_all, "size_mib", 0.1)
    assert empty["best"] is None and empty["gap"] is None and empty["meets_goal"] is False


def test_slack_admits_a_model_a_few_stored_floats_larger(tool):
    # Stage 3's 1-bit trials use LSQ+ activations: their offsets make them 0.42 KiB
    # (0.007 %) larger than the stage-1 recipe, so strictly no searched run is as small;
    # within 0.01 % the better of the two (trial-0006) is, at the same OPs.
    front = [RUNS / "cifar10_stage3"]
    recipe = [f"{RUNS / name}:row=binarydm" for name in ("cifar10_w1a4_s0", "cifar10_w1a4_s1")]
    strict = tool.compare(front, recipe, ["size_mib", "ops_g"], 0.1)
    assert [row["candidates"] for row in strict["gaps"]] == [0, 2]
    slack = tool.compare(front, recipe, ["size_mib", "ops_g"], 0.1, slack=1e-4)
    best = _fid("cifar10_stage3", "trial-0006")
    for row in slack["gaps"]:
        assert row["candidates"] == 2 and row["best"]["run"] == "trial-0006"
        assert row["gap"] == pytest.approx((slack["recipe"]["fid"] - best) / slack["recipe"]["fid"])
    size = slack["gaps"][0]
    assert 0 < size["best"]["size_mib"] / size["recipe"] - 1 < 1e-4
    assert "within 0.01 % of the recipe's cost" in tool.markdown(slack)
    assert "within" not in tool.markdown(strict)


def test_recipe_runs_of_different_configurations_are_refused(tool):
    archive = json.loads((RUNS / "cifar10_w1a4_s0" / "runs.json").read_text())
    lmb, baseline = tool.select_runs(archive, "row=lmb"), tool.select_runs(archive, "row=baseline")
    with pytest.raises(ValueError, match="differ in size_mib"):
        tool.recipe_point(lmb + baseline, ["size_mib"])
    with pytest.raises(ValueError, match="no run matches 'row=nonesuch'"):
        tool.select_runs(archive, "row=nonesuch")


def test_command_line_writes_the_table_and_json(tmp_path):
    out = tmp_path / "gap.json"
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "front_gap.py"),
         "--front", str(RUNS / "cifar10_w1a4_s0"),
         "--recipe", f"{RUNS / 'cifar10_w1a4_s1b'}:trial-0000", "--json", str(out)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "| size_mib | 5.79877 | 2 | 54.40 (cifar10_w1a4_s0/trial-0002)" in completed.stdout
    saved = json.loads(out.read_text())
    assert saved["recipe"]["runs"] == ["cifar10_w1a4_s1b/trial-0000"]
    assert saved["recipe"]["fid_sd"] is None
    bad = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "front_gap.py"),
         "--front", str(RUNS / "cifar10_w1a4_s0"), "--recipe", "trial-0000"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 2 and "ARCHIVE:RUN_NAME or ARCHIVE:PARAM=VALUE" in bad.stderr


def test_stage3_recipes_are_stage1s_rows_as_reported(tool):
    # The recipes of cifar10_w1.md's stage-3 command: v5 and the baseline, seeds 0 and 1,
    # as stage 1's table reports them (88.55 ± 9.18 and 54.95 ± 0.78).
    for row, mean, sd in (("binarydm", 88.55, 9.18), ("baseline", 54.95, 0.78)):
        runs = [
            run
            for name in ("cifar10_w1a4_s0", "cifar10_w1a4_s1")
            for run in tool.select_runs(tool.read_archive(RUNS / name), f"row={row}")
        ]
        point = tool.recipe_point(runs, ["size_mib", "ops_g"])
        assert round(point["fid"], 2) == mean and round(point["fid_sd"], 2) == sd
        assert len(point["runs"]) == 2 and point["size_mib"] == pytest.approx(5.7988, abs=1e-4)
