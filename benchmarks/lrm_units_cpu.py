"""Cost of LRM's feature granularity: 25 unit points vs the 9 block outputs, on the CPU.

    python benchmarks/lrm_units_cpu.py --preset small --batch 32 --resolution 32 --repeats 8

One timed step = student forward + teacher forward (no grad) + noise MSE + LRM loss
+ backward (no optimizer step), for ``lrm.granularity="level"``, ``"unit"`` and, as
the floor, no LRM at all (student forward + noise MSE + backward). The
configurations take turns within each repeat, so load from other processes hits
them alike; the first step of each (PCA bases, LSQ step inits) is timed apart and
left out of the statistics. Wall time is reported as median and min (on a shared
machine the min is the least disturbed step), and the process CPU time per step
as median (descheduling does not count there, OpenMP spin-waiting does). A second
table times the LRM loss alone (projections + MSE, forward and backward, on one
batch's recorded features, 20 times): the part that grows with the number of
points, short enough for its min to dodge other processes. Prints markdown;
writes no file. Runs with torch's default thread count (2 on the
project's CI machine).
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from binarydm import BinaryDMConfig, binarize_
from binarydm.distill import LowRankMimicking
from binarydm.models import build_unet
from binarydm.quant import LRMConfig


def timed_step(student, lrm, x, t, noise) -> tuple[float, float]:
    """(wall s, process CPU s) of one step."""
    start, start_cpu = time.perf_counter(), time.process_time()
    loss = F.mse_loss(student(x, t).sample, noise)
    if lrm is not None:
        loss = loss + lrm(x, t).weighted
    loss.backward()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    student.zero_grad(set_to_none=True)
    return elapsed, cpu


def loss_only_times(lrm: LowRankMimicking, x, t, repeats: int = 20) -> list[float]:
    """Wall s of the LRM loss's forward+backward on fixed features (no UNet in the loop)."""
    with torch.no_grad():
        lrm.student(x, t)
        lrm.teacher_forward(x, t)
    student = {k: v.detach().requires_grad_() for k, v in lrm.student_recorder.features.items()}
    teacher = dict(lrm.teacher_recorder.features)
    lrm.student_recorder.clear()
    lrm.teacher_recorder.clear()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        lrm.loss_fn(student, teacher, step=1).weighted.backward()  # bases already fixed
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    teacher = build_unet(args.preset, sample_size=args.resolution).eval()
    student = binarize_(copy.deepcopy(teacher).train(), BinaryDMConfig())
    x = torch.randn(args.batch, 3, args.resolution, args.resolution)
    t = torch.randint(0, 1000, (args.batch,))
    noise = torch.randn_like(x)

    # Own copies per configuration: recorders sharing a model would all fire on its forward.
    runs = {}
    for granularity in ("level", "unit"):
        run_student, run_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
        config = LRMConfig(granularity=granularity)
        runs[granularity] = (run_student, LowRankMimicking(run_student, run_teacher, config))
    runs["no LRM"] = (copy.deepcopy(student), None)

    first = {name: timed_step(s, lrm, x, t, noise) for name, (s, lrm) in runs.items()}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, (run_student, lrm) in runs.items():
            times[name].append(timed_step(run_student, lrm, x, t, noise))

    print(
        f"preset={args.preset} batch={args.batch} res={args.resolution} "
        f"threads={torch.get_num_threads()} torch={torch.__version__} "
        f"cpu={platform.processor() or platform.machine()} repeats={args.repeats}"
    )
    wall = {name: [w for w, _ in steps] for name, steps in times.items()}
    cpu = {name: statistics.median(c for _, c in steps) for name, steps in times.items()}
    print(
        "| configuration | points | median wall s | min wall s | min x level "
        "| median CPU s | CPU x level | first step wall s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, (_, lrm) in runs.items():
        points = len(lrm.projection.block_names) if lrm is not None else 0
        print(
            f"| {name} | {points} | {statistics.median(wall[name]):.3f} | "
            f"{min(wall[name]):.3f} | {min(wall[name]) / min(wall['level']):.2f} | "
            f"{cpu[name]:.3f} | {cpu[name] / cpu['level']:.2f} | {first[name][0]:.3f} |"
        )
    print()
    print("| LRM loss alone | points | median ms | min ms |")
    print("| --- | --- | --- | --- |")
    for name in ("level", "unit"):
        _, lrm = runs[name]
        alone = loss_only_times(lrm, x, t)
        print(
            f"| {name} | {len(lrm.projection.block_names)} | "
            f"{1e3 * statistics.median(alone):.1f} | {1e3 * min(alone):.1f} |"
        )


if __name__ == "__main__":
    main()
