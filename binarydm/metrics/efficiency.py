"""OPs, BOPs and model size of a (binarized) UNet, counted from the model itself.

Paper accounting (method.md section 7, eq. 16-17): every Conv2d/Linear has
``MACs = out_h*out_w*c_out*c_in*k_h*k_w/groups`` (linear: ``tokens*in*out``); a
quantized layer costs ``BOPs = MACs * b_w * b_a`` (a k-basis binary layer has
``b_w = k``), an FP layer ``FLOPs = MACs``, and ``OPs = BOPs/64 + FLOPs``.

Conventions, chosen to reproduce the paper's LDM-4 LSUN-Bedrooms figures:

- MACs come from forward hooks on one real forward and are reported **per sample**
  (the totals are divided by the batch size of ``example_inputs``).
- Only Conv2d/Linear count: the attention score and value matmuls, norms and
  activations do not (the paper's FP 96.0 G OPs is exactly the conv+linear MACs).
- A quantized layer counts as quantized even while progressive initialization
  keeps it in FP (``active = False``): the report describes the deployed model.
  A binary layer counts its currently computed bases (1 after an EBB switch).
- Size: quantized weights at their bits; binarizer scales (one per active basis
  and output channel), the steps of enabled LSQ quantizers and the offsets of enabled
  LSQ+ ones at 32 bits; every other parameter (biases, norms, embeddings, FP layers)
  at 32 bits. An LSQ+ offset adds no BOPs and keeps the activation bits: it is the
  same ``beta`` on every input value, so at deployment ``W (s*codes + beta)`` folds
  ``W beta`` into the layer's bias (plus a border term where zero padding meets the
  kernel), and the matmul still runs on the b-bit codes. Buffers are
  bookkeeping (init flags, basis counts) and not counted. ``size_mib`` is in MiB,
  which is what the paper calls "MB" (LDM-4: 274,056,163 params * 4 B = 1045.4 MiB).
- Savings are ratios against the same architecture all in FP32: every MAC a
  FLOP, every parameter of the FP model at 32 bits (no scales, steps or offsets).
- ``weight_bits``: the mean bits per weight of the quantized layers, bases counted
  (a layer with k active bases has k bits per weight, an LSQ layer its bits, the
  8-bit first/last layers 8), weighted by their weight counts. A model with a
  second basis in some layers is not "W1": on ``ddpm-cifar10`` two bases in the 2
  outer levels give 1.375.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from binarydm.quant.attention import QuantAttnProcessor
from binarydm.quant.binarizer import MultiBasisBinarizer
from binarydm.quant.layers import QuantMixin
from binarydm.quant.lsq import LSQQuantizer

FP_BITS = 32
BOPS_PER_OP = 64  # the paper's BOPs/64: 64 binary ops cost one FP op
_MIB = 2**20

LayerKind = Literal["conv", "linear"]


@dataclass(frozen=True)
class LayerEfficiency:
    """One Conv2d/Linear: its per-sample MACs, bit widths and what it costs."""

    name: str
    kind: LayerKind
    macs: int
    weight_bits: int
    act_bits: int
    bases: int | None  # active binary bases; None for LSQ and FP layers
    quantized: bool
    params: int
    size_bytes: float
    weight_count: int  # elements of the weight tensor alone (no bias)

    @property
    def flops(self) -> int:
        return 0 if self.quantized else self.macs

    @property
    def bops(self) -> int:
        return self.macs * self.weight_bits * self.act_bits if self.quantized else 0


@dataclass(frozen=True)
class EfficiencyReport:
    """Per-layer rows and model totals; ``to_dict()`` gives the MLflow/Tune metric names.

    ``size_mib`` covers every parameter of the model, so it is larger than the sum
    of the rows' ``size_bytes`` (norms and embeddings have no row).
    """

    layers: tuple[LayerEfficiency, ...]
    macs: int
    flops_g: float
    bops_g: float
    ops_g: float
    size_mib: float
    fp32_ops_g: float
    fp32_size_mib: float
    weight_bits: float  # mean over the quantized layers' weights; 32.0 for an FP model

    @property
    def ops_saving(self) -> float:
        return self.fp32_ops_g / self.ops_g

    @property
    def size_saving(self) -> float:
        return self.fp32_size_mib / self.size_mib

    def to_dict(self) -> dict[str, float]:
        return {
            "macs": self.macs,
            "flops_g": self.flops_g,
            "bops_g": self.bops_g,
            "ops_g": self.ops_g,
            "size_mib": self.size_mib,
            "weight_bits": self.weight_bits,
            "ops_saving": self.ops_saving,
            "size_saving": self.size_saving,
        }


def efficiency_report(
    model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor]
) -> EfficiencyReport:
    """Count ``model``'s OPs and size with one forward on ``example_inputs`` (e.g. ``(x, t)``).

    The model's state is untouched: the forward runs in eval mode without grad and
    with every quantizer switched off, so no LSQ step or binarizer scale gets
    initialised from these inputs.
    """
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    batch = inputs[0].shape[0]
    macs = {name: total // batch for name, total in _count_macs(model, tuple(inputs)).items()}
    layers = tuple(
        _layer_row(name, module, macs.get(name, 0))
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d | nn.Linear)
    )
    total_macs = sum(row.macs for row in layers)
    flops_g = sum(row.flops for row in layers) / 1e9
    bops_g = sum(row.bops for row in layers) / 1e9
    size_bits, fp32_bits = _size_bits(model)
    quantized = [row for row in layers if row.quantized]
    weights = sum(row.weight_count for row in quantized)
    weight_bits = (
        sum(row.weight_count * row.weight_bits for row in quantized) / weights
        if weights
        else float(FP_BITS)
    )
    return EfficiencyReport(
        layers=layers,
        macs=total_macs,
        flops_g=flops_g,
        bops_g=bops_g,
        ops_g=bops_g / BOPS_PER_OP + flops_g,
        size_mib=size_bits / 8 / _MIB,
        fp32_ops_g=total_macs / 1e9,
        fp32_size_mib=fp32_bits / 8 / _MIB,
        weight_bits=weight_bits,
    )


def _count_macs(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, int]:
    """MACs of every Conv2d/Linear summed over all its calls in one forward (whole batch)."""
    macs: dict[str, int] = {}

    def hook(name: str):
        def record(module: nn.Module, args, output: torch.Tensor) -> None:
            if isinstance(module, nn.Conv2d):
                per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
            else:
                per_output = module.in_features
            macs[name] = macs.get(name, 0) + output.numel() * per_output

        return record

    handles = [
        module.register_forward_hook(hook(name))
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d | nn.Linear)
    ]
    switches = [m for m in model.modules() if isinstance(m, QuantMixin | QuantAttnProcessor)]
    was_active = [m.active for m in switches]
    was_training = model.training
    try:
        for module in switches:
            module.active = False
        model.eval()
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
        for module, active in zip(switches, was_active, strict=True):
            module.active = active
        model.train(was_training)
    return macs


def _layer_row(name: str, module: nn.Conv2d | nn.Linear, macs: int) -> LayerEfficiency:
    quantized = isinstance(module, QuantMixin)
    weight_bits = module.weight_bits if quantized else FP_BITS
    act_bits = module.act_bits if quantized else FP_BITS
    binarizer = module.weight_quantizer if quantized else None
    bases = binarizer.num_active if isinstance(binarizer, MultiBasisBinarizer) else None
    params = sum(p.numel() for p in module.parameters(recurse=False))
    size_bits = sum(_param_bits(owner, pname, p) for owner, pname, p in _owned_params(module))
    return LayerEfficiency(
        name=name,
        kind="conv" if isinstance(module, nn.Conv2d) else "linear",
        macs=macs,
        weight_bits=weight_bits,
        act_bits=act_bits,
        bases=bases,
        quantized=quantized,
        params=params,
        size_bytes=size_bits / 8,
        weight_count=module.weight.numel(),
    )


def _owned_params(model: nn.Module):
    """(owning module, local name, parameter) for every parameter under ``model``."""
    for module in model.modules():
        for pname, param in module.named_parameters(recurse=False):
            yield module, pname, param


def _is_quantizer(module: nn.Module) -> bool:
    # LSQPlusQuantizer is an LSQQuantizer: its step and offset are quantizer state too.
    return isinstance(module, MultiBasisBinarizer | LSQQuantizer)


def _param_bits(owner: nn.Module, pname: str, param: torch.Tensor) -> int:
    """Deployed bits of one parameter under the accounting of the module docstring."""
    if isinstance(owner, MultiBasisBinarizer):
        return param[: owner.num_active].numel() * FP_BITS
    if isinstance(owner, LSQQuantizer):
        # Step (and LSQ+ offset) at 32 bits each; a 32-bit quantizer is the identity, so
        # neither is ever deployed.
        return param.numel() * FP_BITS if owner.enabled else 0
    if isinstance(owner, QuantMixin) and pname == "weight":
        return param.numel() * owner.weight_bits
    return param.numel() * FP_BITS


def _size_bits(model: nn.Module) -> tuple[int, int]:
    """(deployed bits, bits of the same model all in FP32 without quantizer parameters)."""
    deployed = fp32 = 0
    for owner, pname, param in _owned_params(model):
        deployed += _param_bits(owner, pname, param)
        if not _is_quantizer(owner):
            fp32 += param.numel() * FP_BITS
    return deployed, fp32
