"""The grid sampler of ``algorithm: grid`` studies, whose trials Ray Tune runs."""

from __future__ import annotations

import contextlib

import optuna


class TunedGridSampler(optuna.samplers.GridSampler):
    """A GridSampler whose trials Ray Tune runs, not ``Study.optimize``.

    At the grid's last trial GridSampler calls ``Study.stop``, which raises outside an
    optimize loop, after the trial is stored: the searcher then warned that a COMPLETE
    trial was "not told again". Tune stops by itself at ``search.trials`` (the grid's
    size), so there is nothing to stop.
    """

    def after_trial(self, study, trial, state, values) -> None:
        with contextlib.suppress(RuntimeError):  # Study.stop outside Study.optimize
            super().after_trial(study, trial, state, values)
