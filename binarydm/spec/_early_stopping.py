"""``search.early_stopping``: stop trials that are dominated at a rung (MO-ASHA).

A rung is a fraction of ``training.steps``: there the trial reports a cheap proxy of its
quality (the held-out ``test_loss`` of the model as it would be deployed) beside its cost
objectives (``ops_g``, ``size_mib``, ... known from the start), and the study's scheduler
keeps the trial only if it is in the top ``1 / reduction_factor`` of the trials recorded at
that rung by non-dominated sorting (Schmucker et al. 2021, MO-ASHA), a front ordered by
NSGA-II's crowding distance or by the epsilon-net (``ranking``). Off by default. The rung
fractions are given either as ``rungs`` or as a geometric ladder from ``min_fraction``
with ratio ``reduction_factor``. With
``stop: false`` the rungs are scored and logged and no trial is stopped: the baseline
that measures the proxy's rank correlation with the final FID.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from binarydm._typed import require
from binarydm.metric_contract import COST, proxy_metric

#: The proxies a rung can rank by: the held-out denoising loss, or a small FID.
Proxy = Literal["test_loss", "fid"]
#: How a rung orders the trials of one non-dominated front (binarydm.search._early_stop).
Ranking = Literal["nsga2", "epsnet"]
_KEY = "search.early_stopping"
#: The rung FID's samples when ``fid_samples`` is null (and fid_dims is below it).
DEFAULT_FID_SAMPLES = 256


def _doc(text: str, **kwargs: Any) -> Any:
    return field(metadata={"doc": text}, **kwargs)


@dataclass(frozen=True, kw_only=True)
class EarlyStoppingSpec:
    """Multi-objective early stopping of trials at rungs (MO-ASHA); off by default."""

    enabled: bool = _doc("stop trials dominated at a rung", default=False)
    stop: bool = _doc(
        "false = score and log every rung but stop no trial (to measure how the proxy "
        "ranks trials against their final FID before trusting it)",
        default=True,
    )
    proxy: Proxy = _doc(
        "what a rung ranks by: test_loss = held-out denoising MSE of the EMA/eval model with "
        "every stage on and EBB switched (the deployed form); fid = a small FID of that "
        "model (fid_samples DDIM samples of sampling_steps steps, the trial's Inception)",
        default="test_loss",
    )
    fid_samples: int | None = _doc(
        "samples of a rung's small FID (proxy fid), more than evaluation.fid_dims; null = "
        "max(256, fid_dims + 1)",
        default=None,
    )
    sampling_steps: int = _doc("DDIM steps of a rung's small FID (proxy fid)", default=10)
    rungs: tuple[float, ...] | None = _doc(
        "rung positions as increasing fractions of training.steps in (0, 1); null = "
        "min_fraction * reduction_factor**k below 1",
        default=None,
    )
    min_fraction: float = _doc(
        "first rung as a fraction of training.steps (when rungs is null)", default=0.1
    )
    reduction_factor: int = _doc(
        "eta: a trial continues past a rung only in the top 1/eta there (>= 2)", default=3
    )
    ranking: Ranking = _doc(
        "order within a non-dominated front at a rung: nsga2 = crowding distance (each "
        "objective's extremes first), then the proxy; epsnet = the best proxy first, then "
        "farthest-first over the objectives scaled to [0, 1] (MO-ASHA's epsilon-net)",
        default="nsga2",
    )

    def __post_init__(self) -> None:
        eta = self.reduction_factor
        require(
            isinstance(eta, int) and not isinstance(eta, bool) and eta >= 2,
            f"{_KEY}.reduction_factor",
            eta,
            "an integer >= 2",
        )
        sizes = [("sampling_steps", self.sampling_steps)]
        if self.fid_samples is not None:
            sizes.append(("fid_samples", self.fid_samples))
        for key, value in sizes:
            require(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                f"{_KEY}.{key}",
                value,
                "an integer >= 1",
            )
        require(
            0 < self.min_fraction < 1,
            f"{_KEY}.min_fraction",
            self.min_fraction,
            "a number in (0, 1)",
        )
        if self.rungs is None:
            return
        rungs = [float(r) for r in self.rungs]
        require(
            bool(rungs)
            and all(0 < r < 1 for r in rungs)
            and all(a < b for a, b in zip(rungs, rungs[1:], strict=False)),
            f"{_KEY}.rungs",
            list(self.rungs),
            "a non-empty, strictly increasing list of fractions in (0, 1)",
        )
        object.__setattr__(self, "rungs", tuple(rungs))

    @property
    def fractions(self) -> tuple[float, ...]:
        """The rung fractions: ``rungs``, or the ladder ``min_fraction * eta**k < 1``."""
        if self.rungs is not None:
            return self.rungs
        out, fraction = [], self.min_fraction
        while fraction < 1 - 1e-9:
            out.append(fraction)
            fraction *= self.reduction_factor
        return tuple(out)

    def rung_steps(self, steps: int) -> tuple[int, ...]:
        """The training steps of the rungs in a run of ``steps``: distinct, in [1, steps).

        A rung that rounds to the last step (or to a step of an earlier rung) is dropped:
        at the last step the trial is evaluated in full anyway.
        """
        out: list[int] = []
        for fraction in self.fractions:
            step = max(1, math.floor(fraction * steps))
            if step < steps and step not in out:
                out.append(step)
        return tuple(out)

    @property
    def metric(self) -> str:
        """The rung metric the scheduler ranks by (``proxy/test_loss``, ``proxy/fid``)."""
        return proxy_metric(self.proxy)

    def proxy_fid_samples(self, fid_dims: int) -> int | None:
        """The rung FID's sample count at ``fid_dims`` (None: the proxy is not ``fid``).

        A small FID needs more samples than feature dimensions (a full-rank covariance):
        ``fid_samples`` set to fewer is an error; unset, it is the larger of
        ``DEFAULT_FID_SAMPLES`` and ``fid_dims + 1``.
        """
        if not (self.enabled and self.proxy == "fid"):
            return None
        if self.fid_samples is None:
            return max(DEFAULT_FID_SAMPLES, fid_dims + 1)
        require(
            self.fid_samples > fid_dims,
            f"{_KEY}.fid_samples",
            self.fid_samples,
            f"more samples than evaluation.fid_dims={fid_dims} (else the covariance is "
            f"singular), or null for max({DEFAULT_FID_SAMPLES}, fid_dims + 1)",
        )
        return self.fid_samples

    def check_fid_dims(self, fid_dims: int) -> None:
        """``proxy_fid_samples`` at the study's fixed ``fid_dims`` (a searched one is
        checked when each trial starts)."""
        self.proxy_fid_samples(fid_dims)

    def check_objectives(self, metrics: list[str]) -> None:
        """Early stopping needs an objective: the proxy stands in for the quality ones."""
        if not self.enabled:
            return
        require(
            bool(metrics),
            f"{_KEY}.enabled",
            True,
            "false unless search.objectives has at least one metric",
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "stop": self.stop,
            "proxy": self.proxy,
            "fid_samples": self.fid_samples,
            "sampling_steps": self.sampling_steps,
            "rungs": list(self.rungs) if self.rungs is not None else None,
            "min_fraction": self.min_fraction,
            "reduction_factor": self.reduction_factor,
            "ranking": self.ranking,
        }


def cost_objectives(metrics: list[str]) -> list[str]:
    """The objectives a rung knows already: the cost ones (OPs, size: fixed by the config).

    The quality objectives (``fid``...) are measured only at the end; the proxy stands in
    for them. Time objectives (``train_s``...) are not known at a rung and are left out.
    """
    return [m for m in metrics if m in COST]
