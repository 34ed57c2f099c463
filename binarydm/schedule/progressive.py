"""Progressive initialization (method.md section 5) and the EBB basis switch.

The state at a step is derived from the step number alone, so every DDP rank
(and a run resumed from a checkpoint) computes the same thing: the official code
ran the schedule on rank 0 only, which breaks multi-GPU training.

Stages: 1 = mid block, 2 = innermost level, ..., L+1 = outermost level,
L+2 = attention-matmul quantizers. With ``stage_steps = n`` every block is FP for
the first n steps and stage i switches on at step ``i * n``; ``stage_steps = 0``
quantizes everything from step 0.
"""

from __future__ import annotations

from torch import nn

from binarydm.quant.apply import num_levels
from binarydm.quant.attention import QuantAttnProcessor
from binarydm.quant.binarizer import MultiBasisBinarizer
from binarydm.quant.config import BinaryDMConfig
from binarydm.quant.layers import QuantMixin


def num_stages(levels: int) -> int:
    return levels + 2


def active_stage(step: int, stage_steps: int, levels: int) -> int:
    """Highest stage switched on at ``step`` (0 = all FP; num_stages = all quantized)."""
    if stage_steps <= 0:
        return num_stages(levels)
    return min(num_stages(levels), step // stage_steps)


def ebb_active_bases(step: int, config: BinaryDMConfig) -> int | None:
    """Bases computed at ``step`` under EBB (2 before the switch, 1 from it); None if EBB is off."""
    if not config.ebb.enabled:
        return None
    return 1 if step >= config.ebb.switch_step else 2


def apply_schedule(model: nn.Module, step: int, config: BinaryDMConfig | None = None) -> int:
    """Set every quantizer's on/off state and EBB basis count for ``step``; return the stage."""
    config = config or model.binarydm_config
    stage = active_stage(step, config.progressive.stage_steps, num_levels(model))
    bases = ebb_active_bases(step, config)
    for module in model.modules():
        if isinstance(module, QuantMixin | QuantAttnProcessor):
            module.active = module.stage <= stage
        if bases is not None and isinstance(module, MultiBasisBinarizer) and module.bases == 2:
            module.set_active_bases(bases)
    return stage
