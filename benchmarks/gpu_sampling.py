"""Sampling throughput on one GPU: eager vs compiled denoising steps, W1A4 vs FP, and the FID pass.

    python3 benchmarks/gpu_sampling.py --json sampling.json          # one H200: under 5 minutes
    python benchmarks/gpu_sampling.py --smoke --json /tmp/smoke.json  # CPU, toy sizes (a check)

Models: the ``ddpm-cifar10`` preset, randomly initialised (speed does not depend on the
weights), as the FP model, and its BinaryDM student (the default config: W1A4, EBB),
deployed as the evaluation scores it: the schedule of a run's last step applied (every
stage on, one basis), quantizers initialised on one batch, weights frozen. A variant is
``<model>-<mode>``: model ``fp`` or ``bdm``, mode ``eager`` or an
``evaluation.sample_compile`` mode (``default``, ``reduce-overhead``); ``-nchw`` keeps the
compiled step's input and frozen weights in NCHW (on a GPU it is channels-last otherwise).
Each is timed through the evaluation's own sampler (``ddim_sample``: bf16 autocast on a
GPU, the ``Denoiser`` of ``evaluation.sample_compile``) at each ``--batches`` size: a
warm-up sampling of ``--warmup-steps`` steps (it compiles: ``compile_s``), then
``--timed-steps`` DDIM steps; every step costs the same, so the DDIM-``--steps`` rate is
``batch / (--steps x seconds per step)``. ``peak_gib`` is the CUDA allocator's peak over
both. The FID part times the Inception features (``FIDScorer``, 2048-d) of
``--fid-images`` random uint8 images at each ``--fid-batches`` size, if the weights are
in the torch hub cache (``TORCH_HOME``); their share of a trial is that time against the
sampling of as many images.

The FID part runs first (seconds), then the variants in the order given, each at every
batch size; one that would start after ``--budget-s`` seconds is skipped (and listed),
and the JSON is rewritten after every measurement, so it holds what finished even when a
time limit ends the run. Results: benchmarks/results/gpu_perf.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from binarydm import BinaryDMConfig, binarize_
from binarydm.models import build_unet, count_parameters
from binarydm.quant import quant_layers
from binarydm.schedule import apply_schedule
from binarydm.train import ddim_sample

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DEFAULT_VARIANTS = (
    "bdm-eager,fp-eager,bdm-reduce-overhead,fp-reduce-overhead,bdm-default,bdm-reduce-overhead-nchw"
)
#: The smoke run's UNet: ``build_unet`` overrides for 2 levels without attention (the
#: smallest graph inductor's CPU build can compile in minutes).
SMOKE_UNET = dict(
    block_out_channels=(8, 16),
    down_block_types=("DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    norm_num_groups=4,
)


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _peak_reset() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else None


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} GiB"


def _cache_counters() -> dict[str, int]:
    """torch's cache outcomes so far: AOTAutograd's (``autograd_cache_*``, a sampling graph
    under no_grad holds no autograd.Function) and inductor's FX graph cache's."""
    from torch._dynamo.utils import counters

    found = {**counters["aot_autograd"], **counters["inductor"]}
    return {k: v for k, v in found.items() if k.startswith(("autograd_cache_", "fxgraph_cache_"))}


def build_models(args) -> dict[str, torch.nn.Module]:
    """The FP model and its deployed, frozen W1A4 student, on the device."""
    torch.manual_seed(0)
    if args.smoke:
        fp = build_unet("tiny", in_channels=1, sample_size=8, **SMOKE_UNET)
    else:
        fp = build_unet(args.preset)
    fp = fp.to(DEVICE).eval()
    config = BinaryDMConfig()
    student = binarize_(copy.deepcopy(fp), config).eval()
    apply_schedule(student, args.qat_steps - 1, args.qat_steps, config)
    res, channels = fp.config.sample_size, fp.config.in_channels
    with torch.no_grad():  # one batch initialises the quantizers, as training's first step
        x = torch.randn(8, channels, res, res, device=DEVICE)
        student(x, torch.randint(0, 1000, (8,), device=DEVICE))
    for _, layer in quant_layers(student):
        layer.freeze_weights()
    return {"fp": fp, "bdm": student}


def parse_variant(name: str) -> tuple[str, str, bool | None]:
    """``bdm-reduce-overhead-nchw`` -> ("bdm", "reduce-overhead", False)."""
    model, _, rest = name.partition("-")
    nchw = rest.endswith("-nchw")
    mode = rest.removesuffix("-nchw")
    if model not in ("fp", "bdm") or mode not in ("eager", "default", "reduce-overhead"):
        raise SystemExit(f"variant {name!r}: expected fp|bdm-eager|default|reduce-overhead[-nchw]")
    return model, mode, (False if nchw else None)


def time_sampling(model, batch: int, mode: str, channels_last, args) -> dict:
    """A warm-up sampling (compiles), then ``--timed-steps`` steps of ``batch`` images."""
    options = dict(
        batch_size=batch,
        autocast_dtype=torch.bfloat16 if DEVICE == "cuda" else None,
        compile="none" if mode == "eager" else mode,
        channels_last=channels_last,
    )
    _peak_reset()
    warm: dict[str, float] = {}
    start = time.perf_counter()
    ddim_sample(model, batch, steps=args.warmup_steps, seed=0, timings=warm, **options)
    _sync()
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    # Wall-clock bounds too: processes sampling at once compare them to see they overlapped.
    timed_start_unix = time.time()
    ddim_sample(model, batch, steps=args.timed_steps, seed=1, **options)
    _sync()
    step_s = (time.perf_counter() - start) / args.timed_steps
    return {
        "timed_unix": [timed_start_unix, time.time()],
        "compile_s": warm["compile_s"],
        "warmup_s": warmup_s,
        "step_ms": step_s * 1000,
        "images_per_s": batch / (step_s * args.steps),
        "peak_gib": _peak_gib(),
    }


def time_fid_features(batch: int, args) -> dict:
    """Seconds and images/s of 2048-d Inception features of ``--fid-images`` images."""
    from binarydm.metrics.fid import FIDScorer

    images = np.random.default_rng(0).integers(
        0, 256, size=(args.fid_images, args.fid_resolution, args.fid_resolution, 3), dtype=np.uint8
    )
    _peak_reset()
    scorer = FIDScorer(2048, device=DEVICE, batch_size=batch, allow_download=False)
    scorer.features(images[:batch])  # cuDNN's algorithm search, outside the timing
    _sync()
    start = time.perf_counter()
    scorer.features(images)
    _sync()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "images_per_s": args.fid_images / seconds, "peak_gib": _peak_gib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="ddpm-cifar10")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--batches", default="1000,250", help="sampling batch sizes")
    parser.add_argument("--steps", type=int, default=100, help="DDIM steps the rate is for")
    parser.add_argument("--timed-steps", type=int, default=10)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--qat-steps", type=int, default=1000, help="the deployed schedule's run")
    parser.add_argument("--fid-batches", default="100,500,1000")
    parser.add_argument("--fid-images", type=int, default=4000)
    parser.add_argument("--fid-resolution", type=int, default=32)
    parser.add_argument("--budget-s", type=float, default=210.0)
    parser.add_argument("--json", default=None)
    parser.add_argument("--smoke", action="store_true", help="toy sizes, for a CPU check")
    args = parser.parse_args()
    if args.smoke:  # every code path, at sizes a CPU runs; no budget (CPU compiles are slow)
        args.batches, args.fid_batches = "2", "4,8"
        args.steps, args.timed_steps, args.warmup_steps = 4, 2, 2
        args.fid_images, args.qat_steps, args.budget_s = 8, 100, 1e9
    batches = [int(b) for b in args.batches.split(",")]
    names = args.variants.split(",")
    plan = [(name, batch, parse_variant(name)) for name in names for batch in batches]
    torch.backends.cudnn.benchmark = True  # as the training loop sets it
    began = time.perf_counter()
    models = build_models(args)
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    report = {
        "device": device,
        "torch": torch.__version__,
        "parameters": count_parameters(models["fp"]),
        "args": vars(args),
        "sampling": {},
        "fid_features": {},
        "skipped": [],
    }
    print(f"{device} | torch {torch.__version__} | {report['parameters']} parameters", flush=True)

    def save() -> None:
        report["elapsed_s"] = time.perf_counter() - began
        report["compile_cache"] = _cache_counters()
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))

    # The FID pass first: seconds, and it is what every trial pays whatever the mode.
    for batch in (int(b) for b in args.fid_batches.split(",")):
        try:
            row = time_fid_features(batch, args)
        except Exception as error:  # no weights on the machine: say so, keep the rest
            report["skipped"].append(f"FID batch {batch}: {type(error).__name__}: {error}")
            break
        report["fid_features"][str(batch)] = row
        print(
            f"FID features batch {batch}: {row['images_per_s']:.0f} images/s "
            f"({row['seconds']:.1f} s for {args.fid_images}), peak {_gib(row['peak_gib'])}",
            flush=True,
        )
        save()
    for name, batch, (model, mode, channels_last) in plan:
        if time.perf_counter() - began > args.budget_s:
            report["skipped"].append(f"{name} at batch {batch}: past --budget-s")
            continue
        row = time_sampling(models[model], batch, mode, channels_last, args)
        report["sampling"].setdefault(name, {})[str(batch)] = row
        print(
            f"{name} batch {batch}: {row['step_ms']:.1f} ms/step, DDIM-{args.steps} "
            f"{row['images_per_s']:.1f} images/s, compile {row['compile_s']:.1f} s, "
            f"warm-up {row['warmup_s']:.1f} s, peak {_gib(row['peak_gib'])}",
            flush=True,
        )
        save()
    save()
    for line in report["skipped"]:
        print(f"skipped: {line}", flush=True)
    print(f"compile caches: {report['compile_cache']}", flush=True)


if __name__ == "__main__":
    main()
