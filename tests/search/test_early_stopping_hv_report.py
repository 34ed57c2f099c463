"""benchmarks/early_stopping_hv.py's analysis of the proxies: pure functions on small,
hand-made records (the report itself reads real studies; these pin its arithmetic)."""

from __future__ import annotations

import numpy as np
import pytest
from bdm_support import load_benchmark


@pytest.fixture(scope="module")
def report():
    return load_benchmark("early_stopping_hv")


def test_spearman_difference_is_the_gap_between_two_proxies_over_the_same_trials(report):
    fid = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    perfect = [10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0]
    # Two neighbouring pairs swapped: Spearman 1 - 6 * 4 / (8 * 63), 24 / 504 below 1.
    swapped = [2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0, 8.0]
    d = report.spearman_difference(perfect, swapped, fid, draws=300)
    assert d["n"] == 8 and d["difference"] == pytest.approx(24 / 504)
    assert d["low"] <= d["difference"] <= d["high"] and d["low"] >= 0
    # A proxy against itself: no difference in any draw.
    same = report.spearman_difference(swapped, swapped, fid, draws=100)
    assert same["difference"] == 0 and same["low"] == same["high"] == 0
    # A proxy that ranks backwards loses by 2, beyond doubt.
    backwards = report.spearman_difference(perfect, perfect[::-1], fid, draws=300)
    assert backwards["difference"] == pytest.approx(2.0) and backwards["low"] > 1
    with pytest.raises(ValueError, match="three or more paired items"):
        report.spearman_difference([1.0, 2.0], [1.0, 2.0], [1.0, 2.0])


def _record(trial_id, fid, *, lr="1e-4", losses=None, fid_proxy=None, seconds=None):
    rungs = {"proxy/test_loss": losses or {15: fid / 100, 45: fid / 200}}
    if fid_proxy:
        rungs["proxy/fid"] = fid_proxy
    if seconds:
        rungs["timing/proxy_test_loss_s"] = {15: seconds[0], 45: seconds[0]}
        rungs["timing/proxy_fid_s"] = {15: seconds[1], 45: seconds[1]}
    metrics = {"fid": fid, "train_s": 100.0, "timing/sample_s": 5.0, "timing/fid_s": 15.0}
    return {"trial_id": trial_id, "run_id": f"run{trial_id}", "metrics": metrics,
            "params": {"training.lr": lr, "method.weight.kind": "binary"},
            "tags": {"searched": "method.weight.kind,training.lr"}, "rungs": rungs}  # fmt: skip


def test_same_configurations_compares_searched_values_trial_by_trial(report):
    off = [_record(0, 5.0), _record(1, 6.0), _record(2, 7.0)]
    off_fid = [_record(0, 5.25, losses={15: 0.06, 45: 0.025}), _record(1, 6.0),
               _record(2, 7.0, lr="3e-4")]  # fmt: skip
    same = report.same_configurations(off_fid, off)
    assert same["trials"] == 3 and same["same_params"] == 2
    assert same["differing_trials"] == [2]
    assert same["max_abs_fid_difference"] == pytest.approx(0.25)
    assert same["max_abs_rung_test_loss_difference"] == pytest.approx(0.01)


def test_rung_costs_and_the_fid_proxys_correlation_per_rung(report):
    records = [
        _record(i, fid, fid_proxy={15: fid + 1, 45: fid}, seconds=(1.0 + i, 10.0 + i))
        for i, fid in enumerate([4.0, 6.0, 5.0, 8.0])
    ]
    costs = report.rung_costs(records)
    fid_cost = costs["timing/proxy_fid_s, rung step 15"]
    assert fid_cost == {"n": 4, "mean_s": 11.5, "sd_s": pytest.approx(1.290994)}
    assert costs["timing/proxy_test_loss_s, rung step 45"]["mean_s"] == 2.5
    assert costs["final sampling + FID"]["mean_s"] == 20.0
    assert costs["train_s (training loop, rungs included)"]["n"] == 4
    # Trial i spends 2 * (1 + i) + 2 * (10 + i) of its 100 s of training in rungs.
    share = costs["rungs' proxies / train_s (fraction)"]
    assert share["mean_s"] == pytest.approx((22 + 26 + 30 + 34) / 4 / 100)
    columns = report._proxy_columns(records)
    assert columns["proxy/fid, rung step 45"] == ("proxy/fid", 45)
    assert columns["final test_loss"] == ("test_loss", None)
    # Both proxies here order the trials exactly as their FIDs: no gap at either rung.
    gaps = report._fid_against_test_loss(records)
    assert set(gaps) == {"rung step 15", "rung step 45"}
    assert gaps["rung step 15"]["difference"] == pytest.approx(0.0)
    # The vectorised rho is scipy's, ties included.
    from scipy.stats import spearmanr

    x, y = [1.0, 2.0, 2.0, 5.0, 3.0], [2.0, 1.0, 4.0, 4.0, 6.0]
    rows = report._spearman_rows(np.array([x]), np.array([y]))
    assert rows[0] == pytest.approx(spearmanr(x, y).statistic)


def test_a_baseline_report_lends_its_reference_point_and_studies(report):
    """A new arm read from its stores beside an earlier report's JSON (stores gone): the
    earlier reference point, and each study paired with the earlier off study of its seed."""
    from binarydm.search import hypervolume

    def finished(trial_id, fid, ops, size, end_s):
        record = _record(trial_id, fid)
        record["metrics"].update({"ops_g": ops, "size_mib": size})
        record.update(status="FINISHED", start_time=0, end_time=int(end_s * 1000))
        return record

    records = [finished(0, 4.0, 0.02, 0.1, 50.0), finished(1, 6.0, 0.01, 0.05, 80.0)]
    pruned = {**_record(2, 9.0), "status": "KILLED", "start_time": 0, "end_time": 30_000,
              "tags": {"state": "PRUNED"}}  # fmt: skip
    study = {"arm": "on_r30_eta4_eps", "sampler_seed": 0, "wall_s": 90.0,
             "records": [*records, pruned]}  # fmt: skip
    studies = {"es_on_r30_eta4_eps_s0": study}
    reference = {"fid": 10.0, "ops_g": 0.03, "size_mib": 0.2}
    off = {"arm": "off", "sampler_seed": 0, "trials_wall_s": 200.0, "final_hypervolume": 0.01,
           "history": [[100.0, 0.005], [200.0, 0.01]], "trials": 24, "finished": 24,
           "pruned": 0, "failed": 0, "command_wall_s": 210.0}  # fmt: skip
    baseline = {"reference_point": reference, "studies": {"es_off_s0": off},
                "correlations": {"off": {"final test_loss": {"n": 3}}}}  # fmt: skip
    result = report.analyse(studies, baseline)
    assert result["reference_point"] == reference
    new = result["studies"]["es_on_r30_eta4_eps_s0"]
    expected = hypervolume(
        [[4.0, 0.02, 0.1], [6.0, 0.01, 0.05]], [10.0, 0.03, 0.2], ["minimize"] * 3
    )
    assert new["final_hypervolume"] == pytest.approx(expected)
    assert (new["finished"], new["pruned"], new["trials_wall_s"]) == (2, 1, 80.0)
    assert result["studies"]["es_off_s0"]["final_hypervolume"] == off["final_hypervolume"]
    pair = result["pairs"]["on_r30_eta4_eps s0"]
    assert pair["time_ratio"] == pytest.approx(0.4)
    assert pair["hv_ratio"] == pytest.approx(expected / 0.01)
    assert result["correlations"]["off"] == {"final test_loss": {"n": 3}}
    assert result["target_hypervolume"] == 0.01  # one off study: no spread to subtract
    assert "time_to_target_s" not in baseline["studies"]["es_off_s0"]  # the input is not edited
    # A new study of an arm the baseline holds would change its numbers: refused.
    studies["es_off_s1"] = {**study, "arm": "off", "sampler_seed": 1}
    with pytest.raises(SystemExit, match=r"already has the arms of \['es_off_s1'\]"):
        report.analyse(studies, baseline)
