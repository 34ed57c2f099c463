"""The Fréchet distance's cost and agreement at 2048 dims: pytorch-fid's sqrtm against ours.

    python benchmarks/frechet_cost.py --images 2100 --workdir /tmp/frechet --json frechet.json

Real features: the FID Inception's 2048-d pool features of the first ``--images`` JPEG
CIFAR-10 test images and of as many train images (the offline copy,
``$BINARYDM_DATA_ROOT``), computed once on the CPU and kept in ``--workdir``. Then, on
their statistics, ``--repeats`` times each: pytorch-fid 0.3.0's
``calculate_frechet_distance`` (SciPy ``sqrtm`` of the product; where this SciPy still
takes its ``disp`` argument) and ``binarydm.metrics.frechet_distance`` (two symmetric
eigendecompositions), their seconds and values. ``--images`` must exceed 2048 for a
full-rank covariance.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch


def features(split: str, count: int, workdir: Path) -> np.ndarray:
    """The split's first ``count`` images' 2048-d features, cached in ``workdir``."""
    from binarydm.data import load_images
    from binarydm.metrics.fid import FIDScorer

    path = workdir / f"cifar10_{split}_{count}_d2048.npy"
    if path.is_file():
        return np.load(path)
    images = load_images("cifar10", split, 32, 3, limit=count)
    started = time.perf_counter()
    found = FIDScorer(2048, device="cpu", batch_size=50).features(images)
    print(f"{split}: {count} images' features in {time.perf_counter() - started:.0f} s")
    np.save(path, found)
    return found


def timed(function, repeats: int) -> tuple[float, list[float]]:
    seconds, value = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        value = function()
        seconds.append(time.perf_counter() - started)
    return value, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("frechet-cost"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.images <= 2048:
        parser.error("--images must exceed 2048: the covariance would be singular")
    from pytorch_fid.fid_score import calculate_frechet_distance

    from binarydm.metrics.fid import feature_statistics, frechet_distance

    args.workdir.mkdir(parents=True, exist_ok=True)
    first = feature_statistics(features("test", args.images, args.workdir))
    second = feature_statistics(features("train", args.images, args.workdir))
    report = {
        "images": args.images,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
    }
    for name, function in (
        ("pytorch_fid_sqrtm", lambda: calculate_frechet_distance(*first, *second)),
        ("binarydm_eigh", lambda: frechet_distance(*first, *second)),
    ):
        value, seconds = timed(function, args.repeats)
        report[name] = {"fid": float(value), "seconds": seconds,
                        "median_s": statistics.median(seconds)}  # fmt: skip
        print(f"{name}: FID {value:.10f}, median {statistics.median(seconds):.2f} s of {seconds}")
    difference = report["binarydm_eigh"]["fid"] - report["pytorch_fid_sqrtm"]["fid"]
    report["difference"] = difference
    print(
        f"difference {difference:.3e} ({difference / report['pytorch_fid_sqrtm']['fid']:.2e} rel)"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
