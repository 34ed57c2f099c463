"""Step time of a BinaryDM student (LRM on, teacher forward included) vs its FP twin.

    python benchmarks/qat_step_cpu.py --preset small --batch 64 --resolution 32 --steps 10

Prints one markdown row per configuration; results live in benchmarks/results/qat_step_cpu.md.
Runs on the CPU with torch's default thread count (2 on the project's CI machine). A step
is the training loop's own (``binarydm.train.step``): forward, LRM term, EBB penalty,
backward, clipping, AdamW.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from binarydm import BinaryDMConfig, binarize_
from binarydm.distill import LowRankMimicking
from binarydm.models import build_unet, count_parameters
from binarydm.train.settings import TrainingSettings
from binarydm.train.step import StepParts, qat_step, teacher_step


def step_time(model, lrm, config, x, t, noise, steps: int, warmup: int = 2) -> float:
    """Median seconds of a teacher step (``config`` None) or a QAT step of ``config``."""
    tau = config.ebb.tau if config is not None and config.ebb.enabled else 0.0
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    parts = StepParts(model, optimizer, lrm=lrm, tau=tau, grad_clip=TrainingSettings().grad_clip)
    step_fn = teacher_step if config is None else qat_step
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        step_fn(parts, x, t, noise, step=i)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    fp = build_unet(args.preset, in_channels=args.channels, sample_size=args.resolution)
    x = torch.randn(args.batch, args.channels, args.resolution, args.resolution)
    t = torch.randint(0, 1000, (args.batch,))
    noise = torch.randn_like(x)
    print(
        f"preset={args.preset} params={count_parameters(fp)} batch={args.batch} "
        f"res={args.resolution} threads={torch.get_num_threads()}"
    )
    print("| configuration | median s/step | x FP |")
    print("| --- | --- | --- |")
    base = step_time(copy.deepcopy(fp), None, None, x, t, noise, args.steps)
    print(f"| FP | {base:.3f} | 1.00 |")
    for label, cfg in [
        (
            "W1A4 1 basis, no LRM",
            BinaryDMConfig().replace(
                **{"weight.bases": 1, "lrm.enabled": False, "ebb.enabled": False}
            ),
        ),
        ("W1A4 2 outer bases, no LRM", BinaryDMConfig().replace(**{"lrm.enabled": False})),
        ("W1A4 2 outer bases + LRM (BinaryDM)", BinaryDMConfig()),
    ]:
        teacher = copy.deepcopy(fp).eval().requires_grad_(False)
        student = binarize_(copy.deepcopy(fp), cfg)
        lrm = LowRankMimicking(student, teacher, cfg.lrm) if cfg.lrm.enabled else None
        seconds = step_time(student, lrm, cfg, x, t, noise, args.steps)
        print(f"| {label} | {seconds:.3f} | {seconds / base:.2f} |")


if __name__ == "__main__":
    main()
