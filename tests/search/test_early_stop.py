"""MO-ASHA's rung decisions on hand-made points, and ``search.early_stopping`` parsing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from binarydm._typed import ConfigError
from binarydm.search import MOASHAScheduler, rung_order, survivors, was_pruned
from binarydm.spec import EarlyStoppingSpec, load_study


def test_fronts_then_crowding_then_proxy_then_arrival():
    # (proxy, ops) minimised: front 0 = 0, 1, 2 (1 between the boundaries), 3 behind 1.
    points = np.array(
        [
            [1.0, 4.0],  # 0 front 0, boundary
            [2.0, 2.0],  # 1 front 0, interior (crowding 2/3 + 2/3)
            [4.0, 1.0],  # 2 front 0, boundary
            [2.5, 2.5],  # 3 front 1 (dominated by 1)
            [5.0, 5.0],  # 4 front 2
        ]
    )
    assert rung_order(points) == [0, 2, 1, 3, 4]
    assert survivors(points, 2) == {0, 2, 1}  # ceil(5 / 2) = 3
    assert survivors(points, 3) == {0, 2}
    assert survivors(points, 5) == {0}  # boundary tie: proxy 1.0 beats 4.0


def test_ties_keep_the_incumbent():
    points = np.array([[1.0, 3.0], [1.0, 3.0], [1.0, 3.0]])
    assert rung_order(points) == [0, 1, 2]
    assert survivors(points, 3) == {0}


def test_epsnet_takes_the_best_proxy_then_spreads_where_crowding_takes_every_extreme():
    # (proxy, ops, size), one front, each objective already spanning [0, 1].
    points = np.array(
        [
            [0.0, 1.0, 1.0],  # 0 best proxy, largest model
            [0.1, 0.5, 0.6],  # 1
            [1.0, 0.0, 0.4],  # 2 worst proxy, fewest OPs
            [0.9, 0.4, 0.0],  # 3 smallest, poor proxy
            [0.2, 0.6, 0.5],  # 4 good proxy, mid costs
        ]
    )
    # NSGA-II: 0, 2, 3 are extremes (infinite crowding), ordered by proxy among them.
    assert rung_order(points, "nsga2")[:3] == [0, 3, 2]
    # Epsilon-net: 0 (best proxy); 2, farthest from 0 (1.54 against 3's 1.47); then 4,
    # whose nearest taken point is 0.67 away (3's: 0.57 to 2, 1's: 0.65 to 0); then 3, 1.
    assert rung_order(points, "epsnet") == [0, 2, 4, 3, 1]
    assert survivors(points, 2, "nsga2") == {0, 2, 3}
    assert survivors(points, 2, "epsnet") == {0, 2, 4}
    # Scaling: the same points in other units rank the same.
    assert rung_order(points * [10.0, 3.0, 0.01], "epsnet") == [0, 2, 4, 3, 1]
    # Fronts still come first, and equal points keep their arrival order.
    assert rung_order(np.vstack([points, [[2.0, 2.0, 2.0]]]), "epsnet")[-1] == 5
    assert rung_order(np.array([[1.0, 3.0]] * 3), "epsnet") == [0, 1, 2]
    with pytest.raises(ValueError, match="ranking='crowding' is invalid"):
        rung_order(points, "crowding")


def test_an_epsnet_scheduler_keeps_a_good_proxy_over_an_extreme():
    spec = load_study(
        "search_spaces/lrm_rank.yaml",
        overrides={"search.early_stopping": {"enabled": True, "ranking": "epsnet"}},
    )
    assert spec.search.early_stopping.to_dict()["ranking"] == "epsnet"
    costs = [("ops_g", "minimize"), ("size_mib", "minimize")]
    arrivals = [[0.0, 1.0, 1.0], [0.1, 0.5, 0.6], [1.0, 0.0, 0.4], [0.9, 0.4, 0.0]]
    good = [0.2, 0.6, 0.5]  # arrives fifth: ceil(5 / 2) = 3 continue
    for ranking, decision in (("nsga2", "STOP"), ("epsnet", "CONTINUE")):
        scheduler = MOASHAScheduler(costs, reduction_factor=2, ranking=ranking)
        for i, point in enumerate(arrivals):
            scheduler.decide(str(i), 0, point)
        # nsga2 keeps the three extremes (0, 2, 3); epsnet 0, 2 and the good proxy.
        assert scheduler.decide("good", 0, good) == decision, ranking
    with pytest.raises(ConfigError, match="ranking='eps' is invalid: allowed one of"):
        load_study(
            "search_spaces/lrm_rank.yaml",
            overrides={"search.early_stopping": {"enabled": True, "ranking": "eps"}},
        )


def test_scheduler_stops_the_dominated_newcomer_and_keeps_the_first():
    scheduler = MOASHAScheduler([("ops_g", "minimize")], reduction_factor=2)
    assert scheduler.decide("a", 0, [1.0, 1.0]) == "CONTINUE"  # alone: ceil(1/2) = 1
    assert scheduler.decide("b", 0, [2.0, 1.0]) == "STOP"  # dominated by a
    assert scheduler.decide("c", 0, [0.5, 1.0]) == "CONTINUE"  # dominates both, 2 kept of 3
    assert scheduler.decide("d", 1, [9.0, 9.0]) == "CONTINUE"  # first at rung 1
    assert scheduler.recorded[0] == {"a": [1.0, 1.0], "b": [2.0, 1.0], "c": [0.5, 1.0]}


class _Trial:
    """What the scheduler reads of a Tune trial: its id."""

    def __init__(self, trial_id):
        self.trial_id = trial_id


def test_maximised_costs_are_negated_and_non_finite_proxies_are_not_recorded():
    scheduler = MOASHAScheduler([("ops_saving", "maximize")], reduction_factor=2)

    first = {"rung": 0, "proxy/test_loss": 1.0, "ops_saving": 10.0}
    worse = {"rung": 0, "proxy/test_loss": 1.0, "ops_saving": 5.0}
    assert scheduler.on_trial_result(None, _Trial("a"), first) == "CONTINUE"
    assert scheduler.on_trial_result(None, _Trial("b"), worse) == "STOP"
    nan = {"rung": 0, "proxy/test_loss": float("nan"), "ops_saving": 1.0}
    assert scheduler.on_trial_result(None, _Trial("c"), nan) == "CONTINUE"
    assert scheduler.recorded[0] == {"a": [1.0, -10.0], "b": [1.0, -5.0]}
    assert scheduler.on_trial_result(None, _Trial("d"), {"loss": 1.0}) == "CONTINUE"


def test_rung_fid_samples_default_to_more_than_the_feature_dims():
    fid = EarlyStoppingSpec(enabled=True, proxy="fid")
    assert fid.proxy_fid_samples(64) == 256 and fid.proxy_fid_samples(2048) == 2049
    assert EarlyStoppingSpec(enabled=True).proxy_fid_samples(64) is None  # test_loss proxy
    with pytest.raises(ConfigError, match="fid_samples=300 is invalid: allowed more samples"):
        EarlyStoppingSpec(enabled=True, proxy="fid", fid_samples=300).proxy_fid_samples(2048)
    # A shipped study's gpu profile (2048-d) loads with the default as well as quick does.
    for profile in ("quick", "gpu"):
        spec = load_study(
            "search_spaces/joint.yaml",
            profile=profile,
            overrides={"search.early_stopping": {"enabled": True, "proxy": "fid"}},
        )
        assert (
            spec.search.early_stopping.proxy_fid_samples(spec.settings.evaluation.fid_dims)
            > spec.settings.evaluation.fid_dims
        )


def test_a_fid_proxy_scheduler_ranks_by_proxy_fid():
    """Under ``proxy: fid`` the scheduler ranks rungs by ``proxy/fid`` (the test loss is
    reported beside it and ignored): b's lower test loss does not save it."""
    spec = load_study(
        "search_spaces/lrm_rank.yaml",
        overrides={"search.early_stopping": {"enabled": True, "proxy": "fid", "rungs": [0.5]}},
    )
    assert spec.search.early_stopping.metric == "proxy/fid"
    from binarydm.search._driver import early_stopping_scheduler

    scheduler = early_stopping_scheduler(spec)
    assert scheduler.proxy == "proxy/fid"

    a = {"rung": 0, "proxy/fid": 10.0, "proxy/test_loss": 0.5}
    b = {"rung": 0, "proxy/fid": 20.0, "proxy/test_loss": 0.1}
    assert scheduler.on_trial_result(None, _Trial("a"), a) == "CONTINUE"
    assert scheduler.on_trial_result(None, _Trial("b"), b) == "STOP"


def test_was_pruned_reads_the_last_result():
    assert was_pruned({"rung": 0, "proxy/test_loss": 1.0})
    assert not was_pruned({"rung": 0, "final": True, "fid": 3.0})
    assert not was_pruned({"loss": 1.0})
    assert not was_pruned({"rung": 0, "error": "diverged"})
    assert not was_pruned(None)


def test_rung_steps_from_fractions_or_the_ladder():
    assert EarlyStoppingSpec(rungs=(0.1, 0.3)).rung_steps(100) == (10, 30)
    ladder = EarlyStoppingSpec(min_fraction=0.1, reduction_factor=3)
    assert ladder.fractions == pytest.approx((0.1, 0.3, 0.9))
    assert ladder.rung_steps(10) == (1, 3, 9)
    # Rounded onto an earlier rung or onto the last step: dropped.
    assert EarlyStoppingSpec(rungs=(0.05, 0.09, 0.99)).rung_steps(10) == (1, 9)
    assert EarlyStoppingSpec(rungs=(0.5, 0.99)).rung_steps(2) == (1,)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"rungs": [0.5, 0.2]}, "search.early_stopping.rungs=[0.5, 0.2] is invalid"),
        ({"rungs": [0.5, 1.0]}, "strictly increasing list of fractions in (0, 1)"),
        ({"reduction_factor": 1}, "search.early_stopping.reduction_factor=1 is invalid"),
        ({"min_fraction": 0}, "search.early_stopping.min_fraction=0.0 is invalid"),
        ({"proxy": "loss"}, "search.early_stopping.proxy='loss' is invalid"),
        (
            {"enabled": True, "proxy": "fid", "fid_samples": 64},
            "search.early_stopping.fid_samples=64 is invalid: allowed more samples than "
            "evaluation.fid_dims=64",
        ),
        ({"sampling_steps": 0}, "search.early_stopping.sampling_steps=0 is invalid"),
        ({"patience": 3}, "search.early_stopping.patience=3 is invalid: unknown key"),
    ],
)
def test_bad_early_stopping_names_the_key(value, message):
    with pytest.raises(ConfigError, match=".") as info:
        load_study("search_spaces/lrm_rank.yaml", overrides={"search.early_stopping": value})
    assert message in str(info.value)


def test_early_stopping_is_off_by_default_and_round_trips():
    spec = load_study("search_spaces/lrm_rank.yaml")
    assert spec.search.early_stopping == EarlyStoppingSpec()
    assert not spec.search.early_stopping.enabled
    on = {"enabled": True, "rungs": [0.2, 0.5], "reduction_factor": 4}
    spec = load_study("search_spaces/lrm_rank.yaml", overrides={"search.early_stopping": on})
    assert spec.to_dict()["search"]["early_stopping"] == {
        "enabled": True, "stop": True, "proxy": "test_loss", "fid_samples": None,
        "sampling_steps": 10, "rungs": [0.2, 0.5],
        "min_fraction": 0.1, "reduction_factor": 4, "ranking": "nsga2",
    }  # fmt: skip


def test_stop_false_scores_the_rungs_under_a_fifo_scheduler():
    """``stop: false`` (the measuring baseline): Tune's default FIFO scheduler, which
    stops no trial, and the same rung steps as with stopping on."""
    from binarydm.search._driver import early_stopping_scheduler
    from binarydm.search._early_stop import MOASHAScheduler

    def spec_with(**early):
        rungs = {"enabled": True, "rungs": [0.1, 0.3], **early}
        return load_study("search_spaces/lrm_rank.yaml", overrides={"search.early_stopping": rungs})

    stopping, observing = spec_with(), spec_with(stop=False)
    assert isinstance(early_stopping_scheduler(stopping), MOASHAScheduler)
    assert early_stopping_scheduler(observing) is None
    assert observing.search.early_stopping.rung_steps(150) == (15, 45)
    assert observing.to_dict()["search"]["early_stopping"]["stop"] is False
    with pytest.raises(ConfigError, match="search.early_stopping.stop"):
        spec_with(stop="sometimes")


def test_a_study_with_early_stopping_prunes_the_dominated_trials(
    ray_cluster, tiny_teacher, tmp_path, monkeypatch
):
    """Three identical configurations one after the other, eta 3, a rung at step 5: the
    first reaches the rung alone and finishes; the others tie with it there, and the tie
    keeps the incumbent, so both are stopped. PRUNED in Optuna with the rung's proxy,
    KILLED (not FAILED) in MLflow with state=PRUNED, out of the Pareto set."""
    import optuna
    from bdm_support import LRM_STUDY, TINY_STUDY
    from mlflow import MlflowClient
    from optuna.trial import TrialState
    from typer.testing import CliRunner

    from binarydm.cli import app

    monkeypatch.chdir(tmp_path)
    early = "{enabled: true, rungs: [0.5], reduction_factor: 3}"
    args = [LRM_STUDY, *TINY_STUDY, "--trials", "3", "--set", "workers.inline=true"]
    args += ["--set", "resources.max_concurrent_trials=1", "--set", "search.fp_reference=false"]
    args += ["--set", "search.space.method.lrm.weight=null"]
    args += ["--set", "search.space.method.lrm.axis=null"]
    args += ["--set", "search.space.method.lrm.rank_divisor={choice: [4]}"]
    args += ["--set", f"search.early_stopping={early}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output

    study = optuna.load_study(study_name="lrm_rank", storage=f"sqlite:///{tmp_path}/optuna.db")
    trials = sorted(study.trials, key=lambda t: t.number)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.PRUNED]
    proxy = trials[1].user_attrs["proxy/test_loss"]
    assert proxy > 0 and trials[2].user_attrs["proxy/test_loss"] == pytest.approx(proxy)
    assert trials[1].user_attrs["rung"] == 0 and trials[1].user_attrs["rung_step"] == 5
    assert trials[1].user_attrs["state"] == "PRUNED"
    assert [t.number for t in study.best_trials] == [0]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("lrm_rank")
    runs = client.search_runs([experiment.experiment_id])
    children = {
        int(r.data.tags["trial_id"]): r for r in runs if r.data.tags.get("bdm.role") == "trial"
    }
    parent = next(r for r in runs if r.data.tags.get("bdm.role") == "parent")
    assert children[0].info.status == "FINISHED" and children[0].data.tags["pareto"] == "true"
    # The finished trial logged its own rung proxy: the same number the pruned ones tied on.
    assert children[0].data.metrics["proxy/test_loss"] == pytest.approx(proxy)
    for number in (1, 2):
        run = children[number]
        assert run.info.status == "KILLED"
        assert run.data.tags["state"] == "PRUNED" and run.data.tags["pruned"] == "true"
        assert run.data.tags.get("pareto") != "true"
        assert "fid" not in run.data.metrics
        (point,) = client.get_metric_history(run.info.run_id, "proxy/test_loss")
        assert point.step == 5 and point.value == pytest.approx(proxy)
        # What the rung cost is kept with it, in MLflow and Optuna alike.
        (cost,) = client.get_metric_history(run.info.run_id, "timing/proxy_test_loss_s")
        assert cost.step == 5 and cost.value > 0
        assert trials[number].user_attrs["timing/proxy_test_loss_s"] == pytest.approx(cost.value)
    assert children[0].data.metrics["timing/proxy_test_loss_s"] > 0
    assert parent.data.metrics["trials_finished"] == 1
    # Counted as pruned, not by their runs' KILLED status, on the parent and the console.
    assert parent.data.metrics["trials_pruned"] == 2 and "trials_killed" not in parent.data.metrics
    assert "trials finished: 1, pruned: 2;" in result.output
    # Hypervolume against time on the parent run: the one finished trial, never the pruned.
    import json

    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"hypervolume_vs_time.png", "hypervolume_history.json"} <= artifacts
    local = client.download_artifacts(parent.info.run_id, "hypervolume_history.json", str(tmp_path))
    (point,) = json.loads(Path(local).read_text())["points"]
    assert point["trials_finished"] == 1 and point["elapsed_s"] > 0
    assert point["hypervolume"] == pytest.approx(parent.data.metrics["hypervolume"])

    # --resume of the study with its pruned trials: they stay PRUNED (Optuna) and KILLED
    # with state=PRUNED (MLflow); nothing is re-run, settled as an orphan or marked FAILED.
    again = CliRunner().invoke(app, [*args, "--resume"])
    assert again.exit_code == 0, again.output
    study = optuna.load_study(study_name="lrm_rank", storage=f"sqlite:///{tmp_path}/optuna.db")
    states = [t.state for t in sorted(study.trials, key=lambda t: t.number)]
    assert states == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.PRUNED]
    runs = client.search_runs([experiment.experiment_id])
    children = {
        int(r.data.tags["trial_id"]): r for r in runs if r.data.tags.get("bdm.role") == "trial"
    }
    assert sorted(children) == [0, 1, 2]
    assert [children[n].data.tags["attempt"] for n in (0, 1, 2)] == ["1", "1", "1"]
    for number in (1, 2):
        assert children[number].info.status == "KILLED"
        assert children[number].data.tags["state"] == "PRUNED"
        assert children[number].data.tags["pareto"] == "false"
    assert children[0].info.status == "FINISHED" and children[0].data.tags["pareto"] == "true"
