"""The denoising step of DDIM sampling: the model run eagerly, or compiled at a fixed batch.

``evaluation.sample_compile`` picks how: ``none`` (the default, the CPU's path) calls
the model as it is; ``default`` runs it through ``torch.compile`` (inductor), and
``reduce-overhead`` also replays it as a CUDA graph, which removes the per-step host
cost of a UNet's few hundred kernel launches. Both compile one static batch shape: a
last, partial batch is padded with zeros to it (every image is denoised on its own:
group norms, convolutions and attention act per image, and the activation quantizers'
steps are fixed by then), and its extra rows are dropped.

A compiled step must read the frozen quantized weights (``QuantMixin.freeze_weights``,
done by the evaluation before sampling), not binarize the latent ones at every step:
the step refuses an active quantized layer that is not frozen. Dynamo lifts the
frozen weights, tensor attributes of the layers, as static graph inputs (CUDA graphs
read them in place), so the activation fake quantization is what stays in the graph
for inductor to fuse. On CUDA the compiled step takes its input and the frozen
convolution weights in channels-last, the layout inductor's layout optimisation picks
for convolutions, so they need no conversion at every step (the gain is not measured
yet: ``benchmarks/gpu_sampling.py``'s ``-nchw`` variant is the comparison).
"""

from __future__ import annotations

import time
from typing import get_args

import torch
from torch import nn

from binarydm.train.settings import SampleCompile

SAMPLE_COMPILE: tuple[str, ...] = get_args(SampleCompile)


class Denoiser:
    """``eps = denoiser(x, t)``: the noise prediction of ``model`` for a batch of at most
    ``batch_size`` images at one timestep ``t`` (a 0-d tensor), under ``autocast_dtype``.

    ``compile_s`` is the wall time of the first compiled call (compilation, or loading
    it from torch's caches, plus one step); 0 when nothing is compiled.
    """

    def __init__(
        self,
        model: nn.Module,
        batch_size: int,
        *,
        compile: SampleCompile = "none",
        autocast_dtype: torch.dtype | None = None,
        channels_last: bool | None = None,
    ) -> None:
        if compile not in SAMPLE_COMPILE:
            raise ValueError(f"compile={compile!r} is invalid: allowed {', '.join(SAMPLE_COMPILE)}")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        self.model = model
        self.device = next(model.parameters()).device
        self.batch_size = batch_size
        self.mode = compile
        self.autocast_dtype = autocast_dtype
        self.compile_s = 0.0
        self._compiled = None
        self._eager_first = False
        self._first_compiled_call = True
        if compile == "none":
            return
        _require_frozen(model)
        if channels_last is None:
            channels_last = self.device.type == "cuda"
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            _frozen_weights_to(model, torch.channels_last)
        # An uninitialised activation quantizer (a layer first switched on here, e.g. at an
        # early rung) sets its step from the first batch it sees: that call runs eagerly,
        # on the unpadded batch, exactly as the eager sampler does; the graph comes after.
        self._eager_first = _needs_init(model)
        self._compiled = torch.compile(model, mode=compile, dynamic=False)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        count = x.shape[0]
        if count > self.batch_size:
            raise ValueError(f"a batch of {count} images exceeds batch_size={self.batch_size}")
        dtype = self.autocast_dtype
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            if self._compiled is not None and not self._eager_first:
                return self._compiled_call(x, t, count)
            self._eager_first = False
            return self.model(x, t.to(self.device).expand(count)).sample

    def _compiled_call(self, x: torch.Tensor, t: torch.Tensor, count: int) -> torch.Tensor:
        if count < self.batch_size:
            x = torch.cat([x, x.new_zeros((self.batch_size - count, *x.shape[1:]))])
        x = x.contiguous(memory_format=self.memory_format)
        timesteps = t.to(self.device).expand(self.batch_size)
        start = time.perf_counter() if self._first_compiled_call else None
        if self.mode == "reduce-overhead":
            # CUDA graph trees: the previous step's outputs are dead from here on.
            torch.compiler.cudagraph_mark_step_begin()
        eps = self._compiled(x, timesteps).sample[:count]
        if self.mode == "reduce-overhead":
            eps = eps.clone()  # the graph's output memory is overwritten by its next replay
        if start is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.compile_s = time.perf_counter() - start
            self._first_compiled_call = False
        return eps


def _require_frozen(model: nn.Module) -> None:
    from binarydm.quant import quant_layers

    unfrozen = [name for name, layer in quant_layers(model) if layer.active and not layer.frozen]
    if unfrozen:
        raise ValueError(
            f"{len(unfrozen)} quantized layers (first: {unfrozen[0]}) are not frozen: a "
            "compiled sampling step would binarize their weights at every step; call "
            "freeze_weights() on every quantized layer before sampling (evaluation does)"
        )


def _frozen_weights_to(model: nn.Module, memory_format: torch.memory_format) -> None:
    from binarydm.quant import quant_layers

    for _, layer in quant_layers(model):
        if layer.frozen and layer.weight.dim() == 4:
            layer.freeze_weights(memory_format=memory_format)


def _needs_init(model: nn.Module) -> bool:
    from binarydm.quant import LSQQuantizer

    return any(m.needs_init for m in model.modules() if isinstance(m, LSQQuantizer))
