"""``binarize_``: the one in-place verb that turns an FP diffusers UNet into a BinaryDM student.

Layer rules (method.md section 3): the time-embedding MLP, class embedding, norms
and activations stay FP; ``conv_in``/``conv_out`` stay FP or go to 8 bits
(``first_last``); every other Conv2d/Linear is quantized. Binary layers in the
``scope_levels`` outermost resolution levels (down_blocks 0..N-1 and the last N
up_blocks) get ``weight.bases`` bases, the rest one basis. The inputs of the body
layers get ``activation.quantizer`` (signed LSQ or LSQ+); the 8-bit first/last layers
and the attention-matmul quantizers keep LSQ.

Progressive-init stages (method.md section 5): 1 = mid block, 2 = innermost level,
..., L+1 = outermost level, L+2 = attention matmuls.
"""

from __future__ import annotations

import re

from torch import nn

from binarydm.quant.attention import QuantAttnProcessor
from binarydm.quant.binarizer import MultiBasisBinarizer
from binarydm.quant.config import BinaryDMConfig
from binarydm.quant.layers import QuantConv2d, QuantLinear, QuantMixin
from binarydm.quant.lsq import LSQQuantizer

_FP_PREFIXES = ("time_embedding", "class_embedding", "time_proj", "add_embedding")
_FIRST, _LAST = "conv_in", "conv_out"


def num_levels(model: nn.Module) -> int:
    """Resolution levels of a UNet (len(down_blocks)); 0 for a model without them."""
    down = getattr(model, "down_blocks", None)
    return len(down) if down is not None else 0


def level_of(name: str, levels: int) -> int | None:
    """Resolution level (0 = outermost) of a submodule name, None for mid/other."""
    match = re.match(r"down_blocks\.(\d+)\.", name)
    if match:
        return int(match.group(1))
    match = re.match(r"up_blocks\.(\d+)\.", name)
    if match:
        return levels - 1 - int(match.group(1))
    return None


def stage_of(name: str, levels: int) -> int:
    """Progressive stage of a quantized layer: mid = 1, innermost level = 2, outermost = L+1."""
    level = level_of(name, levels)
    if level is None:
        return 1
    return levels - level + 1


def attention_stage(levels: int) -> int:
    return levels + 2


def _layer_role(name: str) -> str:
    if name in (_FIRST, _LAST):
        return "first_last"
    if name.startswith(_FP_PREFIXES):
        return "fp"
    return "quant"


def _weight_quantizer(module: nn.Module, name: str, config: BinaryDMConfig, levels: int):
    shape = module.weight.shape
    channel_shape = (shape[0],) + (1,) * (len(shape) - 1)
    if config.weight.kind == "lsq":
        return LSQQuantizer(config.weight.bits, channel_shape=channel_shape)
    level = level_of(name, levels)
    in_scope = level is not None and level < config.weight.scope_levels
    bases = config.weight.bases if in_scope else 1
    return MultiBasisBinarizer(shape, bases)


def _level_label(name: str, levels: int) -> str:
    if name in (_FIRST, _LAST):
        return "first" if name == _FIRST else "last"
    level = level_of(name, levels)
    if level is not None:
        return f"level{level}"
    return "mid" if name.startswith("mid_block") else "other"


def binarize_(model: nn.Module, config: BinaryDMConfig | None = None) -> nn.Module:
    """Apply BinaryDM to ``model`` in place (idempotent guard: refuses a binarized model)."""
    config = config or BinaryDMConfig()
    if getattr(model, "binarydm_config", None) is not None:
        raise ValueError("model is already binarized; build a fresh FP model to binarize again")
    levels = num_levels(model)
    replacements: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if type(module) not in (nn.Conv2d, nn.Linear):
            continue
        role = _layer_role(name)
        if role == "fp" or (role == "first_last" and config.first_last == "fp"):
            continue
        if role == "first_last":
            shape = module.weight.shape
            wq = LSQQuantizer(8, channel_shape=(shape[0],) + (1,) * (len(shape) - 1))
            act_bits, stage = 8, 0  # first/last layers at 8 bits are never staged
            act_kind = "lsq"  # the paper's 8-bit recipe; activation.quantizer is for the body
        else:
            wq = _weight_quantizer(module, name, config, levels)
            act_bits, stage = config.activation.bits, stage_of(name, levels)
            act_kind = config.activation.quantizer
        cls = QuantConv2d if isinstance(module, nn.Conv2d) else QuantLinear
        layer = cls.from_float(
            module, wq, act_bits, level=_level_label(name, levels), stage=stage, act_kind=act_kind
        )
        layer.to(module.weight.device)  # quantizer state was created on the default device
        replacements.append((name, layer))
    for name, layer in replacements:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
    if config.activation.attention_matmul and config.activation.enabled:
        _quantize_attention(model, config, levels)
    model.binarydm_config = config
    return model


def _quantize_attention(model: nn.Module, config: BinaryDMConfig, levels: int) -> None:
    for _, module in model.named_modules():
        if hasattr(module, "set_processor") and hasattr(module, "to_q"):
            processor = QuantAttnProcessor(config.activation.bits, stage=attention_stage(levels))
            module.set_processor(processor.to(module.to_q.weight.device))


def ebb_penalty(model: nn.Module):
    """EBB regulariser: mean over the active two-basis layers of ``mean(s_2)`` (times tau).

    A layer that progressive init still keeps in FP does not use its binarizer; its
    scales get no gradient from this step's forward, and none from the penalty either
    (under DDP, which marks such parameters ready at once, a second gradient is an error).
    """
    terms = [
        layer.weight_quantizer.ebb_penalty()
        for layer in model.modules()
        if isinstance(layer, QuantMixin)
        and layer.active
        and isinstance(layer.weight_quantizer, MultiBasisBinarizer)
        and layer.weight_quantizer.num_active >= 2
    ]
    if not terms:
        return next(model.parameters()).new_zeros(())
    return sum(terms) / len(terms)


def use_composed_quantizers_(model: nn.Module) -> int:
    """Switch every LSQ/LSQ+ quantizer of ``model`` to its plain-ops form (``composed``).

    For ``torch.compile``: the compiled graph then holds no custom ``autograd.Function``
    (the sign STE has none either), which Dynamo traced wrongly on the GPU build (a
    function's input got no gradient: ``binarydm.quant.ste``) and AOTAutograd's cache
    skips by default; inductor fuses the plain ops into the neighbouring kernels. Values
    and gradients are those of the functions (tests/quant/test_lsq.py). Returns how many
    quantizers were switched.
    """
    switched = 0
    for module in model.modules():
        if getattr(module, "implementation", None) == "function":
            module.implementation = "composed"  # an instance attribute: only this model
            switched += 1
    return switched
