"""Time each stage of one trial on the CPU: teacher step, QAT step, DDIM sampling, FID.

    python benchmarks/trial_stages_cpu.py            # the quick profile's sizes (tiny, MNIST 16 px)

Stages are timed in-process (no Ray) at the sizes of the shipped quick profile, so the
numbers say where a `bdm-search trial` spends its minutes; the end-to-end wall time of
the CLI (Ray start, teacher cache, MLflow logging) is recorded separately in
benchmarks/results/trial_cpu.md. Uses torch's default thread count.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

from binarydm import BinaryDMConfig, binarize_
from binarydm.data import load_images
from binarydm.distill import LowRankMimicking
from binarydm.metrics.fid import FIDScorer
from binarydm.models import build_unet, count_parameters
from binarydm.quant import quant_layers
from binarydm.train import ddim_sample, noise_scheduler, noisy_batch, to_uint8
from binarydm.train.settings import TrainingSettings
from binarydm.train.step import StepParts, qat_step, teacher_step


def _median_step(step, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _train_step(model, images, lrm=None, config=None):
    """The loop's step (``binarydm.train.step``): teacher's, or QAT's of ``config``."""
    tau = config.ebb.tau if config is not None and config.ebb.enabled else 0.0
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    parts = StepParts(model, optimizer, lrm=lrm, tau=tau, grad_clip=TrainingSettings().grad_clip)
    step_fn = teacher_step if config is None else qat_step
    sched = noise_scheduler()

    def step():
        x_t, t, noise = noisy_batch(images, sched)
        step_fn(parts, x_t, t, noise, step=0)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--sampling-steps", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    raw = load_images("mnist", "train", args.resolution, 1, limit=args.batch)
    images = torch.from_numpy(raw).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    fp = build_unet(args.preset, in_channels=1, sample_size=args.resolution)
    print(
        f"{args.preset}: {count_parameters(fp)} params, {args.resolution} px, batch {args.batch},"
        f" torch threads {torch.get_num_threads()}, cores {os.cpu_count()}"
    )
    rows = []
    teacher_s = _median_step(_train_step(copy.deepcopy(fp), images), args.repeats)
    rows.append(("FP teacher step", f"{teacher_s:.3f} s", f"{args.batch / teacher_s:.0f} img/s"))
    student = binarize_(copy.deepcopy(fp), BinaryDMConfig())
    lrm = LowRankMimicking(student, copy.deepcopy(fp), BinaryDMConfig().lrm)
    qat_s = _median_step(_train_step(student, images, lrm, BinaryDMConfig()), args.repeats)
    rows.append(
        ("BinaryDM QAT step (LRM and EBB on)", f"{qat_s:.3f} s", f"{qat_s / teacher_s:.2f}x FP")
    )
    student.eval()
    for _, layer in quant_layers(student):
        layer.freeze_weights()
    start = time.perf_counter()
    samples = ddim_sample(student, args.samples, steps=args.sampling_steps, seed=0, batch_size=256)
    sample_s = time.perf_counter() - start
    rows.append(
        (
            f"DDIM-{args.sampling_steps} sampling",
            f"{sample_s:.1f} s",
            f"{args.samples / sample_s:.0f} img/s",
        )
    )
    for dims in (64, 2048):
        scorer = FIDScorer(dims, batch_size=64)
        scorer.features(to_uint8(samples[:64]))  # warm-up
        start = time.perf_counter()
        scorer.features(to_uint8(samples))
        fid_s = time.perf_counter() - start
        rows.append(
            (f"FID features {dims}-d", f"{fid_s:.1f} s", f"{args.samples / fid_s:.0f} img/s")
        )
    print("| stage | time | rate |\n| --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
