"""Forward hooks that capture the block outputs LRM mimics (method.md section 4).

The features are the outputs of every ``down_blocks[i]``, the ``mid_block`` and
every ``up_blocks[j]`` of a diffusers ``UNet2DModel``. A ``FeatureRecorder``
keeps the latest forward's features in an ordered dict keyed by the block's
module name (``"down_blocks.0"``, ``"mid_block"``, ``"up_blocks.2"``).
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Any

import torch
from torch import nn


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


def block_output(output: Any) -> torch.Tensor:
    """The hidden state of a block's output: element 0 of a down block's ``(hidden, res)``."""
    if isinstance(output, tuple | list):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"block returned {type(output).__name__}, expected a tensor or a tuple")
    return output


class FeatureRecorder:
    """Records the block outputs of every forward of a UNet; use as a context or ``remove()``.

    ``features`` is cleared when the model's forward starts, so after a forward it
    holds exactly that forward's blocks in execution order. The tensors keep their
    autograd graph (a student's LRM loss must backpropagate through them).
    """

    def __init__(self, model: nn.Module) -> None:
        unet = unwrap_unet(model)
        self.block_names = [name for name, _ in feature_blocks(unet)]
        self.features: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._handles = [unet.register_forward_pre_hook(self._on_forward_start)]
        for name, block in feature_blocks(unet):
            self._handles.append(block.register_forward_hook(partial(self._record, name)))

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
