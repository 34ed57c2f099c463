"""Exponential moving average of a (binarized) model.

``torch.optim.swa_utils.AveragedModel`` averages parameters, but quantizer state
needs more: boolean/integer buffers (init flags, EBB basis count) must be copied,
not averaged, and a scale or step that was just initialised from data must be
copied too, or the average would drag it towards its placeholder value of 1.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA:
    """Holds ``module``, an EMA copy of a model, updated after each optimizer step."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        fresh = self._just_initialized(model)
        ema_params = dict(self.module.named_parameters())
        for name, param in model.named_parameters():
            target = ema_params[name]
            if any(name.startswith(prefix) for prefix in fresh):
                target.copy_(param)
            else:
                target.lerp_(param.detach(), 1.0 - self.decay)
        ema_buffers = dict(self.module.named_buffers())
        for name, buf in model.named_buffers():
            ema_buffers[name].copy_(buf)

    def _just_initialized(self, model: nn.Module) -> list[str]:
        ema_modules = dict(self.module.named_modules())
        fresh = []
        for name, module in model.named_modules():
            flag = getattr(module, "initialized", None)
            if (
                isinstance(flag, torch.Tensor)
                and bool(flag)
                and not bool(ema_modules[name].initialized)
            ):
                fresh.append(f"{name}." if name else "")
        return fresh

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
