"""Progressive initialization (method.md section 5) and the EBB basis switch.

The state at a step is derived from the step number (and the run's length) alone,
so every DDP rank and a run resumed from a checkpoint compute the same thing: the
official code ran the schedule on rank 0 only, which breaks multi-GPU training.

Stages: 1 = mid block, 2 = innermost level, ..., L+1 = outermost level, L+2 =
attention-matmul quantizers. With ``stage_steps = n`` stage i switches on at step
``(i - 1) * n``, so the mid block is quantized from step 0 as in the official code
(``n = 1`` is its one-step-per-stage warm-up); ``stage_steps = 0`` quantizes
everything from step 0.

EBB (paper v5): the 2-basis layers compute both bases until the switch step
``round(ebb.switch_at * total_steps)`` and one from then on. With the ``anneal``
transition the second basis' gain falls linearly from 1 to 0 over the last
``anneal_fraction`` of the two-basis stage, so dropping it changes nothing; with
``fold`` its least-squares share moves into the first scale at the switch.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

from binarydm.quant.apply import num_levels
from binarydm.quant.attention import QuantAttnProcessor
from binarydm.quant.binarizer import MultiBasisBinarizer
from binarydm.quant.config import BinaryDMConfig
from binarydm.quant.layers import QuantMixin


def num_stages(levels: int) -> int:
    return levels + 2


def active_stage(step: int, stage_steps: int, levels: int) -> int:
    """Highest stage switched on at ``step`` (num_stages = everything quantized)."""
    if stage_steps <= 0:
        return num_stages(levels)
    return min(num_stages(levels), step // stage_steps + 1)


def last_stage(levels: int, config: BinaryDMConfig) -> int:
    """The last stage that switches something on: attention matmuls only if quantized."""
    attention = config.activation.attention_matmul and config.activation.enabled
    return num_stages(levels) if attention else num_stages(levels) - 1


def stage_start(stage: int, stage_steps: int) -> int:
    """The step at which ``stage`` switches on."""
    return (stage - 1) * max(stage_steps, 0)


class ScheduleState(NamedTuple):
    """What the schedule set for a step: the stage, EBB's bases and second-basis gain."""

    stage: int
    bases: int | None  # EBB's basis count of the 2-basis layers; None without EBB
    gain: float  # the second basis' gain (1 outside EBB's anneal)


def ebb_bases(step: int, config: BinaryDMConfig, total_steps: int) -> int | None:
    """Bases computed at ``step`` under EBB (2 before the switch, 1 from it); None if off."""
    if not config.ebb.enabled:
        return None
    return 1 if step >= config.ebb.switch_step(total_steps) else 2


def ebb_gain(step: int, config: BinaryDMConfig, total_steps: int) -> float:
    """The second basis' gain at ``step``: 1, falling linearly to 0 at the switch under
    the ``anneal`` transition (the last two-basis step keeps ``1 / window``)."""
    ebb = config.ebb
    if not ebb.enabled or ebb.transition != "anneal":
        return 1.0
    switch, start = ebb.switch_step(total_steps), ebb.anneal_start(total_steps)
    if step < start:
        return 1.0
    if step >= switch:
        return 0.0
    return (switch - step) / (switch - start)


def schedule_state(step: int, total_steps: int, levels: int, config: BinaryDMConfig):
    stage = active_stage(step, config.progressive.stage_steps, levels)
    return ScheduleState(
        stage, ebb_bases(step, config, total_steps), ebb_gain(step, config, total_steps)
    )


def apply_schedule(
    model: nn.Module, step: int, total_steps: int, config: BinaryDMConfig | None = None
) -> ScheduleState:
    """Set every quantizer's on/off state and EBB's bases and gain for ``step`` of a run of
    ``total_steps``; returns what was set. Dropping the second basis folds it first
    under ``ebb.transition="fold"``."""
    config = config or model.binarydm_config
    state = schedule_state(step, total_steps, num_levels(model), config)
    fold = config.ebb.transition == "fold"
    for module in model.modules():
        if isinstance(module, QuantMixin | QuantAttnProcessor):
            module.active = module.stage <= state.stage
        if not isinstance(module, QuantMixin) or state.bases is None:
            continue
        binarizer = module.weight_quantizer
        if not isinstance(binarizer, MultiBasisBinarizer) or binarizer.bases != 2:
            continue
        if state.bases < binarizer.num_active and fold and binarizer._initialized:
            binarizer.fold_second_basis(module.weight)
        binarizer.set_active_bases(state.bases)
        binarizer.set_second_basis_gain(state.gain)
    return state


def check_schedule(
    levels: int, config: BinaryDMConfig, total_steps: int, *, prefix: str = ""
) -> None:
    """Raise ``ConfigError`` when a stage or the EBB switch would fall outside the run.

    Every progressive stage must begin by the last trained step (evaluation scores the
    model of that step, so a later stage would be evaluated in FP), and the EBB switch
    must come after every stage is on (else a 2-basis layer switched on later never
    trains with its second basis). ``prefix`` qualifies the keys named in the error
    (``"method."`` in trial settings).
    """
    from binarydm._typed import require

    stage_steps = config.progressive.stage_steps
    last = last_stage(levels, config)
    begins = stage_start(last, stage_steps)
    allowed = (total_steps - 1) // (last - 1) if last > 1 else total_steps
    require(
        begins <= total_steps - 1,
        f"{prefix}progressive.stage_steps",
        stage_steps,
        f"at most {allowed} with training.steps={total_steps} on a {levels}-level UNet "
        f"(stage {last} would begin at step {begins}, after the last step {total_steps - 1})",
    )
    if config.ebb.enabled:
        switch = config.ebb.switch_step(total_steps)
        require(
            switch > begins,
            f"{prefix}ebb.switch_at",
            config.ebb.switch_at,
            f"a switch after the last progressive stage begins (step {begins}): the switch "
            f"would be at step {switch} of {total_steps}",
        )
