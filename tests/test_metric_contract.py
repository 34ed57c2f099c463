"""The metric contract's names: timing under its prefix, per-seed curves, objectives."""

from binarydm import metric_contract as mc


def test_per_seed_curves_are_contract_names_and_nothing_else_under_a_seed_prefix():
    assert mc.is_trial_metric(mc.seed_prefix(2) + "loss_noise")
    assert mc.is_trial_metric(mc.seed_prefix(0) + "lr")
    assert not mc.is_trial_metric(mc.seed_prefix(0) + "fid")  # seeds are averaged, not logged
    assert not mc.is_trial_metric("seedx.loss") and not mc.is_trial_metric("fid_typo")


def test_timing_names_sit_under_the_prefix_and_objectives_keep_theirs():
    assert all(name.startswith(mc.TIMING_PREFIX) for name in (*mc.TIMINGS, *mc.LAUNCH_STAMPS))
    assert not set(mc.METRIC_DIRECTIONS) & set(mc.TIMINGS)
    assert set(mc.THROUGHPUT) <= set(mc.METRIC_DIRECTIONS)
    assert mc.timing("fit_s") in mc.AVERAGED and mc.timing("fit_s") + "_std" in mc.TRIAL_METRICS
    assert mc.ACTOR_CREATED not in mc.AVERAGED  # moments are not averaged over seeds
