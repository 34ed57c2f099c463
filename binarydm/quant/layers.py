"""Conv2d/Linear layers with fake-quantized weights and LSQ- (or LSQ+-) quantized inputs.

A quantized layer keeps its FP ``weight`` (the latent weight QAT updates) and
quantizes on the fly. ``active`` is set by the progressive schedule: an inactive
layer computes in full precision. ``freeze_weights()`` caches the quantized weight
for inference so sampling does not re-binarize on every denoising step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from binarydm.quant.binarizer import MultiBasisBinarizer
from binarydm.quant.config import ActivationQuantizer
from binarydm.quant.lsq import LSQQuantizer
from binarydm.quant.lsq_plus import LSQPlusQuantizer

Role = str  # "binary" | "lsq" | "first_last"


def activation_quantizer(kind: ActivationQuantizer, bits: int) -> LSQQuantizer:
    """The input quantizer of a layer: signed LSQ (the paper's) or LSQ+ (learned offset)."""
    if kind == "lsq_plus":
        return LSQPlusQuantizer(bits)
    return LSQQuantizer(bits, signed=True)


class QuantMixin:
    """Shared state of QuantConv2d / QuantLinear."""

    weight: nn.Parameter
    weight_quantizer: nn.Module
    act_quantizer: LSQQuantizer

    def _init_quant(
        self,
        weight_quantizer: nn.Module,
        act_bits: int,
        *,
        level: str,
        stage: int,
        act_kind: ActivationQuantizer = "lsq",
    ) -> None:
        self.weight_quantizer = weight_quantizer
        self.act_quantizer = activation_quantizer(act_kind, act_bits)
        self.level = level  # "mid", "level0".., "first", "last", "other": for reports
        self.stage = stage  # progressive-init stage that switches this layer on
        self.active = True
        self._frozen_weight: torch.Tensor | None = None

    # -- weight view ----------------------------------------------------------------
    def quantized_weight(self) -> torch.Tensor:
        if self._frozen_weight is not None:
            return self._frozen_weight
        return self.weight_quantizer(self.weight)

    @torch.no_grad()
    def freeze_weights(self, memory_format: torch.memory_format = torch.preserve_format) -> None:
        """Cache the quantized weight, in ``memory_format`` (channels-last for a compiled
        NHWC sampling step: the cache is then read in the layout its convolution uses)."""
        self._frozen_weight = (
            self.weight_quantizer(self.weight).detach().to(memory_format=memory_format)
        )

    @property
    def frozen(self) -> bool:
        """Whether forward reads the cached quantized weight (``freeze_weights``)."""
        return self._frozen_weight is not None

    def unfreeze_weights(self) -> None:
        self._frozen_weight = None

    @property
    def weight_bits(self) -> int:
        """Bits per weight as counted by BOPs/size (k bases count k bits)."""
        q = self.weight_quantizer
        if isinstance(q, MultiBasisBinarizer):
            return q.num_active
        return q.bits

    @property
    def act_bits(self) -> int:
        return self.act_quantizer.bits

    def _inputs_and_weight(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.active:
            return x, self.weight
        return self.act_quantizer(x), self.quantized_weight()


class QuantConv2d(QuantMixin, nn.Conv2d):
    """nn.Conv2d whose forward uses the fake-quantized weight and input."""

    @classmethod
    def from_float(
        cls,
        conv: nn.Conv2d,
        weight_quantizer: nn.Module,
        act_bits: int,
        *,
        level: str,
        stage: int,
        act_kind: ActivationQuantizer = "lsq",
    ) -> QuantConv2d:
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        layer.load_state_dict(conv.state_dict())
        layer._init_quant(weight_quantizer, act_bits, level=level, stage=stage, act_kind=act_kind)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, w = self._inputs_and_weight(x)
        return self._conv_forward(x, w, self.bias)


class QuantLinear(QuantMixin, nn.Linear):
    """nn.Linear whose forward uses the fake-quantized weight and input."""

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        weight_quantizer: nn.Module,
        act_bits: int,
        *,
        level: str,
        stage: int,
        act_kind: ActivationQuantizer = "lsq",
    ) -> QuantLinear:
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        layer.load_state_dict(linear.state_dict())
        layer._init_quant(weight_quantizer, act_bits, level=level, stage=stage, act_kind=act_kind)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, w = self._inputs_and_weight(x)
        return F.linear(x, w, self.bias)


def quant_layers(model: nn.Module):
    """(name, layer) for every quantized conv/linear of a model."""
    for name, module in model.named_modules():
        if isinstance(module, QuantMixin):
            yield name, module
