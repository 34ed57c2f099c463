"""Forward hooks that capture the features LRM mimics (method.md section 4).

Two granularities of feature points on a diffusers ``UNet2DModel``, both in
forward order and keyed by module name:

- ``"unit"`` (the default; the official code hooks every ``TimestepEmbedSequential``
  of the LDM UNet): ``conv_in``; in each down block every resnet with its attention
  (``down_blocks.1.attentions.0`` where the block has attentions, else
  ``down_blocks.0.resnets.0``), then its downsampler (``down_blocks.0.downsamplers.0``)
  as a unit of its own; the ``mid_block``; in each up block every resnet with its
  attention, the last of them taking the upsampler in (``up_blocks.0.upsamplers.0``).
  25 points on ``ddpm-cifar10``.
- ``"level"``: the 2L+1 outputs of every ``down_blocks[i]``, the ``mid_block`` and
  every ``up_blocks[j]`` (``"down_blocks.0"``, ``"mid_block"``, ``"up_blocks.2"``).
  9 points on ``ddpm-cifar10``.

A ``FeatureRecorder`` keeps the latest forward's features in an ordered dict.
Hooks sit on the modules themselves, so build it after ``binarize_`` (which
replaces ``conv_in`` when ``first_last="int8"``, and only Conv2d/Linear layers
inside the other points).
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Any

import torch
from torch import nn

from binarydm.quant.config import LRMGranularity


def unwrap_unet(model: nn.Module) -> nn.Module:
    """The UNet inside a DDP (``.module``) or ``torch.compile`` (``._orig_mod``) wrapper."""
    while not hasattr(model, "down_blocks"):
        inner = getattr(model, "module", None)
        if inner is None:
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            raise ValueError(
                f"{type(model).__name__} has no down_blocks/up_blocks: LRM needs a diffusers "
                "UNet2DModel (optionally wrapped in DistributedDataParallel or torch.compile)"
            )
        model = inner
    return model


def feature_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) of every down block, the mid block (if any) and every up block, in order."""
    unet = unwrap_unet(model)
    blocks = [(f"down_blocks.{i}", block) for i, block in enumerate(unet.down_blocks)]
    # UNet2DModel(mid_block_type=None) has no mid block: there is nothing to mimic there.
    if getattr(unet, "mid_block", None) is not None:
        blocks.append(("mid_block", unet.mid_block))
    blocks += [(f"up_blocks.{j}", block) for j, block in enumerate(unet.up_blocks)]
    return blocks


def _resnet_units(prefix: str, block: nn.Module) -> list[tuple[str, nn.Module]]:
    """The module ending each resnet(+attention) unit of a down or up block."""
    resnets = getattr(block, "resnets", None)
    # Skip blocks run a resnet_down/skip_conv path after their resnets that no point here
    # would see; guessing their units would mimic the wrong tensors.
    if resnets is None or hasattr(block, "skip_conv"):
        raise ValueError(
            f"{prefix} ({type(block).__name__}) has no plain resnets[+attentions] layout: "
            "use lrm.granularity='level' for this UNet"
        )
    attentions = getattr(block, "attentions", None)
    if attentions is None:
        return [(f"{prefix}.resnets.{j}", resnet) for j, resnet in enumerate(resnets)]
    if len(attentions) != len(resnets) or any(attn is None for attn in attentions):
        raise ValueError(
            f"{prefix} ({type(block).__name__}) pairs {len(resnets)} resnets with "
            f"{len(attentions)} attentions: use lrm.granularity='level' for this UNet"
        )
    # The attention runs on its resnet's output: the pair's output is the attention's.
    return [(f"{prefix}.attentions.{j}", attn) for j, attn in enumerate(attentions)]


def _last_sampler(prefix: str, samplers: nn.ModuleList | None) -> list[tuple[str, nn.Module]]:
    # diffusers applies its samplers in sequence (always one): the last one's output counts.
    if not samplers:
        return []
    last = len(samplers) - 1
    return [(f"{prefix}.{last}", samplers[last])]


def feature_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) ending every timestep-embedded unit, in forward order (see the docstring)."""
    unet = unwrap_unet(model)
    units = [("conv_in", unet.conv_in)]
    for i, block in enumerate(unet.down_blocks):
        units += _resnet_units(f"down_blocks.{i}", block)
        units += _last_sampler(f"down_blocks.{i}.downsamplers", block.downsamplers)
    if getattr(unet, "mid_block", None) is not None:
        units.append(("mid_block", unet.mid_block))
    for i, block in enumerate(unet.up_blocks):
        block_units = _resnet_units(f"up_blocks.{i}", block)
        upsampler = _last_sampler(f"up_blocks.{i}.upsamplers", block.upsamplers)
        # The LDM UNet's last output unit of a level is (resnet, [attention], upsample).
        if upsampler:
            block_units[-1] = upsampler[0]
        units += block_units
    return units


def feature_points(
    model: nn.Module, granularity: LRMGranularity = "unit"
) -> list[tuple[str, nn.Module]]:
    """(name, module) whose outputs LRM mimics at ``granularity``, in forward order."""
    if granularity == "unit":
        return feature_units(model)
    if granularity == "level":
        return feature_blocks(model)
    raise ValueError(f"granularity={granularity!r} is invalid: allowed 'unit' or 'level'")


def block_output(output: Any) -> torch.Tensor:
    """The hidden state of a block's output: element 0 of a down block's ``(hidden, res)``."""
    if isinstance(output, tuple | list):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"block returned {type(output).__name__}, expected a tensor or a tuple")
    return output


class FeatureRecorder:
    """Records the feature points of every forward of a UNet; use as a context or ``remove()``.

    ``granularity`` picks the points (``feature_points``); ``block_names`` lists them
    in forward order. ``features`` is cleared when the model's forward starts, so
    after a forward it holds exactly that forward's points in execution order. The
    tensors keep their autograd graph (a student's LRM loss must backpropagate
    through them).
    """

    def __init__(self, model: nn.Module, granularity: LRMGranularity = "unit") -> None:
        unet = unwrap_unet(model)
        points = feature_points(unet, granularity)
        self.granularity = granularity
        self.block_names = [name for name, _ in points]
        self.features: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._handles = [unet.register_forward_pre_hook(self._on_forward_start)]
        for name, module in points:
            self._handles.append(module.register_forward_hook(partial(self._record, name)))

    def _on_forward_start(self, module: nn.Module, args: Any) -> None:
        self.features.clear()

    def _record(self, name: str, module: nn.Module, args: Any, output: Any) -> None:
        self.features[name] = block_output(output)

    def clear(self) -> None:
        """Drop the recorded tensors (and with them the graph they keep alive)."""
        self.features.clear()

    def remove(self) -> None:
        """Detach every hook; the recorder stops recording and holds nothing."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def __enter__(self) -> FeatureRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
