"""BinaryDMConfig: the frozen, validated description of one BinaryDM quantization.

Every knob of the method (method.md sections 1-5) lives here so that a search
space can address it by a dotted key (``weight.bases``, ``lrm.rank_divisor``)
and a run can be reproduced from its JSON.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from binarydm._typed import build, flatten, require, set_dotted

WeightKind = Literal["binary", "lsq"]
FirstLastMode = Literal["fp", "int8"]
LRMAxis = Literal["channel", "width"]

ACTIVATION_BITS = (4, 8, 32)
LSQ_WEIGHT_BITS = (2, 4, 8)


_require = require


@dataclass(frozen=True)
class WeightQuantConfig:
    """How weights of quantized layers are represented.

    ``kind="binary"``: ``bases`` residual sign bases (1 = XNOR baseline, 2 = LMB)
    applied to the ``scope_levels`` outermost resolution levels; the rest keep 1.
    ``kind="lsq"``: per-channel LSQ weights at ``bits`` (the paper's W2/W4 baseline).
    """

    kind: WeightKind = "binary"
    bases: int = 2
    scope_levels: int = 2
    bits: int = 2

    def __post_init__(self) -> None:
        _require(self.kind in ("binary", "lsq"), "weight.kind", self.kind, "'binary' or 'lsq'")
        _require(
            isinstance(self.bases, int) and 1 <= self.bases <= 3,
            "weight.bases",
            self.bases,
            "an integer in 1..3",
        )
        _require(
            isinstance(self.scope_levels, int) and self.scope_levels >= 0,
            "weight.scope_levels",
            self.scope_levels,
            "an integer >= 0 (0 = one basis everywhere)",
        )
        _require(
            self.bits in LSQ_WEIGHT_BITS, "weight.bits", self.bits, f"one of {LSQ_WEIGHT_BITS}"
        )


@dataclass(frozen=True)
class EBBConfig:
    """Evolvable-basis binarizer: train with 2 bases, regularise s_2, drop it at ``switch_step``."""

    enabled: bool = False
    tau: float = 9e-2
    switch_step: int = 100_000

    def __post_init__(self) -> None:
        _require(self.tau >= 0, "ebb.tau", self.tau, "a float >= 0")
        _require(
            isinstance(self.switch_step, int) and self.switch_step >= 0,
            "ebb.switch_step",
            self.switch_step,
            "an integer >= 0",
        )


@dataclass(frozen=True)
class ActivationQuantConfig:
    """LSQ activation quantization on the input of every quantized layer."""

    bits: int = 4
    attention_matmul: bool = False

    def __post_init__(self) -> None:
        _require(
            self.bits in ACTIVATION_BITS,
            "activation.bits",
            self.bits,
            f"one of {ACTIVATION_BITS} (32 = off)",
        )

    @property
    def enabled(self) -> bool:
        return self.bits < 32


@dataclass(frozen=True)
class LRMConfig:
    """Low-rank representation mimicking of the FP teacher's block outputs."""

    enabled: bool = True
    rank_divisor: int = 4
    axis: LRMAxis = "channel"
    weight: float = 1e-4
    refresh_every: int = 0  # 0 = projection fixed from the first batch (paper's best)

    def __post_init__(self) -> None:
        _require(
            isinstance(self.rank_divisor, int) and self.rank_divisor >= 1,
            "lrm.rank_divisor",
            self.rank_divisor,
            "an integer >= 1",
        )
        _require(self.axis in ("channel", "width"), "lrm.axis", self.axis, "'channel' or 'width'")
        _require(self.weight >= 0, "lrm.weight", self.weight, "a float >= 0")
        _require(
            isinstance(self.refresh_every, int) and self.refresh_every >= 0,
            "lrm.refresh_every",
            self.refresh_every,
            "an integer >= 0 (0 = fixed)",
        )


@dataclass(frozen=True)
class ProgressiveConfig:
    """Progressive initialization: iterations per stage, 0 = everything quantized at step 0."""

    stage_steps: int = 0

    def __post_init__(self) -> None:
        _require(
            isinstance(self.stage_steps, int) and self.stage_steps >= 0,
            "progressive.stage_steps",
            self.stage_steps,
            "an integer >= 0",
        )


@dataclass(frozen=True)
class BinaryDMConfig:
    """One BinaryDM quantization recipe; ``BinaryDMConfig()`` is the paper's W1A4 default."""

    weight: WeightQuantConfig = field(default_factory=WeightQuantConfig)
    ebb: EBBConfig = field(default_factory=EBBConfig)
    activation: ActivationQuantConfig = field(default_factory=ActivationQuantConfig)
    first_last: FirstLastMode = "fp"
    lrm: LRMConfig = field(default_factory=LRMConfig)
    progressive: ProgressiveConfig = field(default_factory=ProgressiveConfig)

    def __post_init__(self) -> None:
        _require(self.first_last in ("fp", "int8"), "first_last", self.first_last, "'fp' or 'int8'")
        if self.ebb.enabled:
            _require(
                self.weight.kind == "binary" and self.weight.bases == 2,
                "ebb.enabled",
                True,
                "only with weight.kind='binary' and weight.bases=2 (EBB evolves 2 bases into 1)",
            )

    # -- serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BinaryDMConfig:
        return build(cls, data)

    @classmethod
    def from_json(cls, text: str) -> BinaryDMConfig:
        return cls.from_dict(json.loads(text))

    def flat(self) -> dict[str, Any]:
        """Dotted-key view (``weight.bases`` -> 2), the form search spaces and MLflow params use."""
        return flatten(self.to_dict())

    def replace(self, **dotted: Any) -> BinaryDMConfig:
        """A copy with dotted keys overridden: ``cfg.replace(**{"lrm.weight": 1.0})``."""
        data = self.to_dict()
        for key, value in dotted.items():
            set_dotted(data, key, value)
        return BinaryDMConfig.from_dict(data)
