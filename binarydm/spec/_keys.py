"""The names a study file uses: metrics and their directions, and the settings keys.

Built from ``TrialSettings`` and the metric contract (``binarydm.metric_contract``), so the parser,
the ``--set`` checks and the JSON Schema agree on what a key may be.
"""

from __future__ import annotations

from typing import Literal

from binarydm.metric_contract import METRIC_DIRECTIONS, Direction  # noqa: F401 (the spec's names)
from binarydm.train.settings import TrialSettings

Algorithm = Literal["nsga2", "tpe", "random", "grid"]
# Built from the table so the two cannot disagree; the JSON Schema's enum comes from it.
Metric = Literal[tuple(METRIC_DIRECTIONS)]  # type: ignore[valid-type]
DATA_ROOT_ENV = "BINARYDM_DATA_ROOT"
#: ``--profile none`` applies no profile, so no profile may be called that.
NO_PROFILE = "none"
#: Dotted ``TrialSettings`` keys a study may fix, override or search. Not ``seed``: each
#: run's seed comes from ``search.seeds``, so a fixed one would be silently ignored.
SETTINGS_KEYS: tuple[str, ...] = tuple(k for k in TrialSettings().flat() if k != "seed")
# workers.inline is set, not searched: a trial's resources are reserved before its
# parameters are sampled, and inline decides what the trial itself reserves.
UNSEARCHABLE = {"workers.inline": "not searchable (it decides what every trial reserves)"}
SEARCHABLE_KEYS: tuple[str, ...] = tuple(k for k in SETTINGS_KEYS if k not in UNSEARCHABLE)
