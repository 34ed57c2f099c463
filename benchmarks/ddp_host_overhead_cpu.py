"""Host-side cost of DDP's unused-parameter search on a BinaryDM UNet (2 gloo processes, CPU).

    python benchmarks/ddp_host_overhead_cpu.py --preset ddpm-cifar10 --resolution 8 --steps 30

On a GPU the QAT step is host-bound (benchmarks/results/gpu_perf.md), so host work that
DDP adds per step shows up in the step time. This times forward + backward + AdamW of
the binarized UNet at batch 1 on an 8x8 input (compute kept small so the host work is
visible) in two processes under DDP with ``find_unused_parameters`` True and False, and
in one process without DDP. The difference between the two DDP rows is the per-step
cost of the search (an autograd-graph walk); the allreduce is the same in both.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel


def _steps(model, x, t, steps: int) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    times = []
    for i in range(steps + 3):
        start = time.perf_counter()
        loss = F.mse_loss(model(x, t).sample, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 3:  # warm-up
            times.append((time.perf_counter() - start) * 1000)
    return times


def _build(preset: str, resolution: int):
    from binarydm import binarize_
    from binarydm.models import build_unet

    torch.manual_seed(0)
    model = binarize_(build_unet(preset, in_channels=3, sample_size=resolution))
    x, t = torch.randn(1, 3, resolution, resolution), torch.tensor([10])
    model(x, t)  # initialise quantizers
    return model, x, t


def _worker(rank: int, args, find_unused: bool, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model, x, t = _build(args.preset, args.resolution)
    ddp = DistributedDataParallel(model, find_unused_parameters=find_unused)
    times = _steps(ddp, x, t, args.steps)
    if rank == 0:
        queue.put(statistics.median(times))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="ddpm-cifar10")
    parser.add_argument("--resolution", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--port", type=int, default=29533)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, x, t = _build(args.preset, args.resolution)
    single = statistics.median(_steps(model, x, t, args.steps))
    rows = [("1 process, no DDP", single)]
    ctx = mp.get_context("spawn")
    for find_unused in (False, True):
        queue = ctx.Queue()
        mp.start_processes(_worker, (args, find_unused, queue), nprocs=2, start_method="spawn")
        rows.append((f"2 processes, DDP find_unused_parameters={find_unused}", queue.get()))
        args.port += 1
    print(f"{args.preset} binarized (W1A4), batch 1, {args.resolution}x{args.resolution}, CPU")
    print("| setting | ms/step (median) |\n| --- | --- |")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} |")


if __name__ == "__main__":
    main()
