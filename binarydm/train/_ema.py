"""Exponential moving average of a (binarized) model.

``torch.optim.swa_utils.AveragedModel`` averages parameters, but quantizer state
needs more: boolean/integer buffers (init flags, EBB basis count) must be copied,
not averaged, and a scale or step that was just initialised from data must be
copied too, or the average would drag it towards its placeholder value of 1.
Quantizers keep Python mirrors of their flag buffers (so forward never syncs the
GPU); the EMA copies those mirrors too, or the averaged model would re-initialise
a quantizer that the live model initialised after the EMA was created.

With ``warmup`` the decay of update n is ``min(decay, (1 + n) / (10 + n))``, DDPM's
schedule: a fixed 0.999 would still put 22% of its weight on the freshly binarized
start after 1500 steps. ``reset`` restarts the average from the live model (at the
EBB switch, so the deployed 1-basis model is not averaged with 2-basis weights).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA:
    """Holds ``module``, an EMA copy of a model, updated after each optimizer step."""

    def __init__(self, model: nn.Module, decay: float, *, warmup: bool = False) -> None:
        self.decay = decay
        self.warmup = warmup
        self.updates = 0  # since creation or the last reset
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self._pairs: tuple[int, _Pairs] | None = None

    def current_decay(self) -> float:
        """The decay the next update uses."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Restart the average at ``model``'s current weights (and its warm-up)."""
        pairs = self._pairs_for(model)
        torch._foreach_copy_(pairs.ema_params, pairs.params)
        if pairs.buffers:
            torch._foreach_copy_(pairs.ema_buffers, pairs.buffers)
        for src, dst in pairs.quantizers:
            for attr in src.host_mirrors:
                setattr(dst, attr, getattr(src, attr))
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        self.updates += 1
        pairs = self._pairs_for(model)
        # A quantizer initialised since the last update (progressive stages switch layers
        # on later) has its fresh scales copied. Read from the mirrors: no GPU sync.
        fresh = {
            id(p)
            for src, dst in pairs.quantizers
            if src._initialized and not dst._initialized
            for p in dst.parameters()
        }
        ema_params, params = [], []
        for ema_param, param in zip(pairs.ema_params, pairs.params, strict=True):
            if id(ema_param) in fresh:
                ema_param.copy_(param)
            else:
                ema_params.append(ema_param)
                params.append(param)
        if ema_params:
            # One fused kernel series instead of a Python loop of lerps over every tensor.
            torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        if pairs.buffers:
            torch._foreach_copy_(pairs.ema_buffers, pairs.buffers)
        for src, dst in pairs.quantizers:
            for attr in src.host_mirrors:
                setattr(dst, attr, getattr(src, attr))

    def _pairs_for(self, model: nn.Module) -> _Pairs:
        if self._pairs is None or self._pairs[0] != id(model):
            self._pairs = (id(model), _Pairs(model, self.module))
        return self._pairs[1]

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])


class _Pairs:
    """Live and EMA parameters, buffers and quantizer modules, matched by name once."""

    def __init__(self, model: nn.Module, ema: nn.Module) -> None:
        ema_params = dict(ema.named_parameters())
        ema_buffers = dict(ema.named_buffers())
        ema_modules = dict(ema.named_modules())
        names = [n for n, _ in model.named_parameters()]
        self.params = [p.detach() for _, p in model.named_parameters()]
        self.ema_params = [ema_params[n] for n in names]
        named_buffers = list(model.named_buffers())
        self.buffers = [b for _, b in named_buffers]
        self.ema_buffers = [ema_buffers[n] for n, _ in named_buffers]
        self.quantizers = [
            (m, ema_modules[n]) for n, m in model.named_modules() if hasattr(m, "host_mirrors")
        ]
