"""BinaryDMConfig: the frozen, validated description of one BinaryDM quantization.

Every knob of the method (method.md sections 1-5) lives here so that a search
space can address it by a dotted key (``weight.bases``, ``lrm.rank_divisor``)
and a run can be reproduced from its JSON.

Named recipes (``RECIPES``), each following one version of the paper:

- ``BinaryDMConfig.baseline()``: the 1-bit baseline (one sign basis with a learned
  per-channel scale, LSQ activations, no LRM, no progressive init).
- ``BinaryDMConfig.v1()``: BinaryDM of paper v1/v2 (arXiv 2404.05662v1/v2): the
  learnable multi-basis binarizer keeps 2 bases in the 2 outer resolution levels,
  LRM, progressive init. NOT pure 1-bit: 1.375 bits per quantized weight on
  ``ddpm-cifar10`` (the "W1.1" of the paper is LDM-4's share).
- ``BinaryDMConfig.v5()`` = ``BinaryDMConfig()``: BinaryDM of paper v5 (ICLR 2025):
  the evolvable-basis binarizer trains those 2 bases in a first stage and drops the
  second at the switch, so the deployed model is pure 1-bit at the baseline's size;
  LRM and progressive init as in v1.

The bits a model really has are counted from it (``weight_bits`` of
``binarydm.metrics.efficiency``), never read off a recipe's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from binarydm._typed import FrozenConfig, require

WeightKind = Literal["binary", "lsq"]
FirstLastMode = Literal["fp", "int8"]
LRMAxis = Literal["channel", "width"]
LRMGranularity = Literal["unit", "level"]
ActivationQuantizer = Literal["lsq", "lsq_plus"]
EBBTransition = Literal["anneal", "fold", "drop"]

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


#: The EBB switch leaves at least this share of the training steps to train the
#: 1-basis model on (recovery); the EMA restarts at the switch.
EBB_MIN_RECOVERY = 0.1


@dataclass(frozen=True)
class EBBConfig:
    """Evolvable-basis binarizer (paper v5): the 2-basis layers train with both bases,
    ``tau * mean(s_2)`` regularises the second, and at the switch it is dropped.

    ``switch_at`` is a fraction of the training steps (paper: 100k of 200k = 0.5), so
    the switch can never fall past the end of a run. ``transition`` is how the second
    basis leaves: ``anneal`` scales its contribution linearly to 0 over the last
    ``anneal_fraction`` of the two-basis stage, so the switch itself changes nothing
    (the paper's regulariser does this slowly over 100k steps; at search budgets Adam
    moves the scales by about lr per step, far too little); ``fold`` adds its least-
    squares projection onto the first basis to the first scale at the switch; ``drop``
    removes it as it is (the paper's switch; abrupt when s_2 was not shrunk).
    """

    enabled: bool = True
    tau: float = 9e-2
    switch_at: float = 0.5
    transition: EBBTransition = "anneal"
    anneal_fraction: float = 0.5

    def __post_init__(self) -> None:
        _require(self.tau >= 0, "ebb.tau", self.tau, "a float >= 0")
        _require(
            0 < self.switch_at <= 1 - EBB_MIN_RECOVERY,
            "ebb.switch_at",
            self.switch_at,
            f"a fraction of training.steps in (0, {1 - EBB_MIN_RECOVERY:g}] (at least "
            f"{EBB_MIN_RECOVERY:.0%} of the run trains the 1-basis model after the switch)",
        )
        _require(
            self.transition in ("anneal", "fold", "drop"),
            "ebb.transition",
            self.transition,
            "'anneal', 'fold' or 'drop'",
        )
        _require(
            0 < self.anneal_fraction <= 1,
            "ebb.anneal_fraction",
            self.anneal_fraction,
            "a fraction in (0, 1] of the two-basis stage",
        )

    def switch_step(self, total_steps: int) -> int:
        """The first step trained with one basis: ``round(switch_at * total_steps)``, >= 1."""
        return max(1, round(self.switch_at * total_steps))

    def anneal_start(self, total_steps: int) -> int:
        """The first step whose second-basis gain is below 1 (``transition="anneal"``)."""
        switch = self.switch_step(total_steps)
        return switch - max(1, round(self.anneal_fraction * switch))


@dataclass(frozen=True)
class ActivationQuantConfig:
    """Activation quantization on the input of every quantized layer.

    ``quantizer="lsq"``: the paper's LSQ, a signed symmetric range with a learned step.
    ``quantizer="lsq_plus"``: LSQ+ (Bhalgat et al. 2020), an unsigned range shifted by a
    learned offset: most quantized layers read SiLU outputs (>= -0.278), which a signed
    range covers with half its levels wasted on negatives.
    """

    bits: int = 4
    quantizer: ActivationQuantizer = "lsq"
    attention_matmul: bool = False

    def __post_init__(self) -> None:
        _require(
            self.bits in ACTIVATION_BITS,
            "activation.bits",
            self.bits,
            f"one of {ACTIVATION_BITS} (32 = off)",
        )
        _require(
            self.quantizer in ("lsq", "lsq_plus"),
            "activation.quantizer",
            self.quantizer,
            "'lsq' (signed, the paper's) or 'lsq_plus' (learned offset)",
        )

    @property
    def enabled(self) -> bool:
        return self.bits < 32


@dataclass(frozen=True)
class LRMConfig:
    """Low-rank representation mimicking of the FP teacher's features.

    ``granularity="unit"`` mimics every timestep-embedded unit, as the official code
    hooks every ``TimestepEmbedSequential`` (conv_in, each resnet with its attention,
    each downsampler, the mid block, each up unit with its upsampler: 25 on
    ``ddpm-cifar10``); ``"level"`` only the 2L+1 outputs of the down blocks, the mid
    block and the up blocks (9 on ``ddpm-cifar10``). One projection per feature.
    """

    enabled: bool = True
    rank_divisor: int = 4
    axis: LRMAxis = "channel"
    weight: float = 1e-4
    refresh_every: int = 0  # 0 = projection fixed from the first batch (paper's best)
    granularity: LRMGranularity = "unit"

    def __post_init__(self) -> None:
        _require(
            isinstance(self.rank_divisor, int) and self.rank_divisor >= 1,
            "lrm.rank_divisor",
            self.rank_divisor,
            "an integer >= 1",
        )
        _require(self.axis in ("channel", "width"), "lrm.axis", self.axis, "'channel' or 'width'")
        _require(
            self.granularity in ("unit", "level"),
            "lrm.granularity",
            self.granularity,
            "'unit' (every timestep-embedded unit, the official code) or 'level'",
        )
        _require(self.weight >= 0, "lrm.weight", self.weight, "a float >= 0")
        _require(
            isinstance(self.refresh_every, int) and self.refresh_every >= 0,
            "lrm.refresh_every",
            self.refresh_every,
            "an integer >= 0 (0 = fixed)",
        )


@dataclass(frozen=True)
class ProgressiveConfig:
    """Progressive initialization: stage i (1 = mid block, then inner to outer levels)
    switches on at step ``(i - 1) * stage_steps``; 0 = everything quantized at step 0.
    1 is the official code's warm-up (one step per stage)."""

    stage_steps: int = 1

    def __post_init__(self) -> None:
        _require(
            isinstance(self.stage_steps, int) and self.stage_steps >= 0,
            "progressive.stage_steps",
            self.stage_steps,
            "an integer >= 0",
        )


@dataclass(frozen=True)
class BinaryDMConfig(FrozenConfig):
    """One BinaryDM quantization; ``BinaryDMConfig()`` is ``BinaryDMConfig.v5()``, the ICLR
    (paper v5) BinaryDM at W1A4: pure 1-bit once trained (see the module docstring)."""

    #: Version of this schema (FrozenConfig): a packed model's config of another version is
    #: refused, not guessed. 2: EBB's switch as a fraction of the run, its transition.
    CONFIG_VERSION: ClassVar[int] = 2

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
                "only with weight.kind='binary' and weight.bases=2 (EBB evolves 2 bases into "
                f"1; weight is kind={self.weight.kind!r}, bases={self.weight.bases}): set "
                "ebb.enabled=false for another weight representation",
            )
            _require(
                self.weight.scope_levels >= 1,
                "ebb.enabled",
                True,
                "only with weight.scope_levels >= 1 (no layer would have the 2 bases EBB "
                "evolves): set ebb.enabled=false or scope_levels >= 1",
            )

    # -- named recipes ---------------------------------------------------------------
    @classmethod
    def baseline(cls, **dotted: Any) -> BinaryDMConfig:
        """The 1-bit baseline: one basis everywhere, LSQ A4, no LRM, no progressive init."""
        return cls().replace(
            **{
                "weight.bases": 1,
                "ebb.enabled": False,
                "lrm.enabled": False,
                "progressive.stage_steps": 0,
                **dotted,
            }
        )

    @classmethod
    def v1(cls, **dotted: Any) -> BinaryDMConfig:
        """BinaryDM of paper v1/v2 (LMB): 2 bases kept in the 2 outer levels (NOT pure 1-bit), LRM,
        progressive init."""
        return cls().replace(**{"ebb.enabled": False, **dotted})

    @classmethod
    def v5(cls, **dotted: Any) -> BinaryDMConfig:
        """BinaryDM of paper v5 (ICLR 2025), = ``BinaryDMConfig()``: EBB (2 bases in the 2
        outer levels, the second dropped at the switch: pure 1-bit), LRM, progressive init."""
        return cls().replace(**dotted)

    @property
    def deployed_bases(self) -> int:
        """Bases of the outer-level binary layers once trained (EBB drops its second)."""
        return 1 if self.ebb.enabled else self.weight.bases


#: Recipe name -> factory (keyword overrides as dotted keys: ``RECIPES["v5"](**{...})``).
RECIPES = {
    "baseline": BinaryDMConfig.baseline,
    "v1": BinaryDMConfig.v1,
    "v5": BinaryDMConfig.v5,
}
