"""Diffusion pieces of training and evaluation: noise-prediction loss, held-out loss, DDIM.

The noise schedule and the sampler are diffusers' own (``DDPMScheduler`` for
``add_noise``, ``DDIMScheduler`` for sampling) so a binarized UNet is trained and
sampled exactly like its FP teacher.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

from binarydm.train._denoiser import Denoiser, SampleCompile


def noise_scheduler(num_train_timesteps: int = 1000) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="linear")


def noisy_batch(
    images: torch.Tensor, scheduler: DDPMScheduler, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, t, noise) for clean ``images`` in [-1, 1]; noise/t drawn on ``generator``'s
    device (the CPU without one), so a CPU generator gives the same draw on any device."""
    batch = images.shape[0]
    where = generator.device if generator is not None else torch.device("cpu")
    noise = torch.randn(images.shape, generator=generator, device=where)
    noise = noise.to(images.device, images.dtype)
    timesteps = torch.randint(
        0, scheduler.config.num_train_timesteps, (batch,), generator=generator, device=where
    ).to(images.device)
    return scheduler.add_noise(images, noise, timesteps), timesteps, noise


@torch.no_grad()
def held_out_loss(
    model: nn.Module,
    images: torch.Tensor,
    scheduler: DDPMScheduler,
    *,
    seed: int = 1234,
    batch_size: int = 256,
) -> float:
    """Noise-prediction MSE on ``images`` at fixed noise and timesteps (the ``test_loss``)."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, images.shape[0], batch_size):
        clean = images[start : start + batch_size].to(device)
        x_t, t, noise = noisy_batch(clean, scheduler, generator)
        pred = model(x_t, t).sample.float()
        total += torch.sum((pred - noise.float()) ** 2).item()
        count += noise.numel()
    return total / count


@torch.no_grad()
def ddim_sample(
    model: nn.Module,
    num_images: int,
    *,
    steps: int,
    seed: int,
    batch_size: int = 250,
    num_train_timesteps: int = 1000,
    autocast_dtype: torch.dtype | None = None,
    compile: SampleCompile = "none",
    channels_last: bool | None = None,
    on_step: Callable[[], None] | None = None,
    timings: dict[str, float] | None = None,
) -> torch.Tensor:
    """``num_images`` deterministic DDIM (eta = 0) samples in [-1, 1], NCHW float32 on the CPU.

    ``compile`` is how the denoising step runs (``binarydm.train._denoiser``): eagerly
    (``none``) or compiled at the batch ``min(batch_size, num_images)``, its input and
    frozen convolution weights in channels-last if ``channels_last`` (None: on CUDA).
    ``on_step`` is called after each denoising step of each batch (a progress bar's
    ``ceil(num_images / batch_size) * steps`` units); ``timings`` receives ``compile_s``,
    the first compiled step's seconds (0 when eager)."""
    device = next(model.parameters()).device
    config = model.config
    shape = (config.in_channels, config.sample_size, config.sample_size)
    sampler = DDIMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="linear")
    sampler.set_timesteps(steps)
    denoiser = Denoiser(
        model,
        min(batch_size, num_images),
        compile=compile,
        autocast_dtype=autocast_dtype,
        channels_last=channels_last,
    )
    generator = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, num_images, batch_size):
        count = min(batch_size, num_images - start)
        x = torch.randn((count, *shape), generator=generator).to(device)
        for t in sampler.timesteps:
            eps = denoiser(x, t)
            x = sampler.step(eps.float(), t, x).prev_sample
            if on_step is not None:
                on_step()
        out.append(x.clamp(-1, 1).cpu())
    if timings is not None:
        timings["compile_s"] = denoiser.compile_s
    return torch.cat(out)


def to_uint8(images: torch.Tensor) -> numpy.ndarray:  # noqa: F821
    """[-1, 1] NCHW float -> uint8 NHWC numpy (what FID and the PNG grid take)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
