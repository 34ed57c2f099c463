"""The Optuna form of a study's search space: distributions, define-by-run space, samplers.

What ``ray.tune.search.optuna.OptunaSearch`` needs from a ``SearchSpec``: a
distribution dict, or a define-by-run function when a dimension has ``when`` (a
fixed dict cannot leave a parameter out), and the seeded sampler of each
algorithm. Optuna is imported inside the functions that need it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from binarydm.spec import CATEGORICAL, Dimension

if TYPE_CHECKING:
    import optuna

    from binarydm.spec import SearchSpec


def distribution(dimension: Dimension) -> optuna.distributions.BaseDistribution:
    """The Optuna distribution of ``dimension`` (its ``when`` aside)."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    if dimension.kind in CATEGORICAL:
        return CategoricalDistribution(list(dimension.choices))
    if dimension.kind == "int":
        return IntDistribution(
            int(dimension.low), int(dimension.high), log=dimension.log, step=dimension.step
        )
    return FloatDistribution(float(dimension.low), float(dimension.high), log=dimension.log)


def suggest(dimension: Dimension, trial: optuna.Trial) -> Any:
    """Sample ``dimension`` in a define-by-run ``trial``."""
    if dimension.kind in CATEGORICAL:
        return trial.suggest_categorical(dimension.key, list(dimension.choices))
    if dimension.kind == "int":
        return trial.suggest_int(
            dimension.key,
            int(dimension.low),
            int(dimension.high),
            step=dimension.step,
            log=dimension.log,
        )
    return trial.suggest_float(
        dimension.key, float(dimension.low), float(dimension.high), log=dimension.log
    )


def optuna_distributions(search: SearchSpec) -> dict[str, optuna.distributions.BaseDistribution]:
    """``{dotted key: distribution}`` for every dimension, ignoring ``when``."""
    return {key: distribution(dimension) for key, dimension in search.space.items()}


@dataclass(frozen=True)
class DefineByRunSpace:
    """A define-by-run space for ``OptunaSearch(space=...)``: suggests active dimensions in order.

    A class rather than a closure because Tune pickles the searcher (with plain
    ``pickle``) when it checkpoints the experiment.
    """

    dimensions: tuple[Dimension, ...]

    def __call__(self, trial: optuna.Trial) -> None:
        params: dict[str, Any] = {}
        for dimension in self.dimensions:
            if dimension.active(params):
                params[dimension.key] = suggest(dimension, trial)


def optuna_space(search: SearchSpec) -> dict[str, Any] | DefineByRunSpace:
    """The ``space`` argument of ``OptunaSearch``: a distribution dict, or define-by-run if
    any dimension has ``when`` (a fixed dict cannot leave a parameter out)."""
    if search.conditional:
        return DefineByRunSpace(tuple(search.space.values()))
    return optuna_distributions(search)


def build_sampler(search: SearchSpec) -> optuna.samplers.BaseSampler:
    """The Optuna sampler of ``search.algorithm``, seeded with ``search.sampler_seed``."""
    import optuna

    seed = search.sampler_seed
    if search.algorithm == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=search.population_size, seed=seed)
    if search.algorithm == "tpe":
        with warnings.catch_warnings():
            # multivariate/group are flagged experimental; they are what lets TPE model
            # interacting knobs and conditional (``when``) dimensions.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(
                multivariate=True,
                group=search.conditional,
                n_startup_trials=search.startup_trials,
                seed=seed,
            )
    if search.algorithm == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    grid = {key: list(dimension.choices) for key, dimension in search.space.items()}
    from binarydm.search._grid import TunedGridSampler

    return TunedGridSampler(grid, seed=seed)
