"""Time each start-up stage of a trial in N fresh processes started together.

    python benchmarks/trial_startup.py benchmarks/studies/gpu_overhead.yaml \
        --teacher /tmp/bdmcache/teachers/<key> --processes 8 --json startup.json

A study's first wave starts all its trial actors at once; this starts N interpreters
at once (as Ray starts actor processes) and has each do what a trial does before its
first training step, timing every stage: imports (torch, Ray Tune, MLflow's SQL store,
the project, diffusers' UNet), the CUDA context, the training set onto the device, the
teacher loaded, copied and binarised, both moved to the device, the LRM built, and the
first training step (cuDNN's algorithm search included). Processes go round-robin over
the visible GPUs. Run it once with --processes 1 for the uncontended times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def child(args: argparse.Namespace) -> None:
    """One trial's start-up, printed as one JSON line of stage -> seconds."""
    stages: dict[str, float] = {"process_start_to_main": time.time() - args.launched}
    mark = time.perf_counter()

    def stage(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        stages[name] = now - mark
        mark = now

    import torch

    stage("import_torch")
    import ray.tune  # noqa: F401

    stage("import_ray_tune")
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401

    stage("import_mlflow_store")
    import binarydm.search._trainable  # noqa: F401
    import binarydm.train._runner  # noqa: F401
    from binarydm.spec import load_study
    from binarydm.train import load_training_images, to_training_device, to_unit_range

    stage("import_binarydm")
    from binarydm.models import load_unet

    stage("import_diffusers_unet")
    settings = load_study(args.file).trial_settings({}, 0)
    if torch.cuda.is_available():
        device = torch.device("cuda", args.rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        torch.zeros(1, device=device)
        torch.cuda.synchronize(device)
    else:
        device = torch.device("cpu")
    stage("cuda_context")
    images = load_training_images(settings, args.data_root, None)
    images = to_training_device(images, device)
    stage("training_set")
    student = load_unet(args.teacher)
    stage("load_teacher")
    host = args.host_build  # the order before session 6: copied and binarised on the host
    if not host:
        student.to(device)
        stage("to_device")
    import copy

    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    stage("copy_teacher")
    from binarydm.quant import binarize_

    binarize_(student, settings.method)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stage("binarize")
    if host:
        student.to(device)
        teacher.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stage("to_device")
    from binarydm.distill import LowRankMimicking

    lrm = LowRankMimicking(student, teacher, settings.method.lrm).to(device)
    stage("lrm")
    torch.backends.cudnn.benchmark = True
    from binarydm.train.step import StepParts, qat_step

    ebb = settings.method.ebb
    parts = StepParts(
        student,
        torch.optim.AdamW(student.parameters(), lr=1e-5),
        lrm=lrm,
        tau=ebb.tau if ebb.enabled else 0.0,
        grad_clip=settings.training.grad_clip,
        autocast_dtype=torch.bfloat16 if device.type == "cuda" else None,
    )
    batch = to_unit_range(images[: settings.training.batch_size].to(device))
    t = torch.randint(0, 1000, (batch.shape[0],), device=device)
    qat_step(parts, batch, t, torch.zeros_like(batch), step=0)  # the loop's step
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stage("first_step")
    print(json.dumps(stages), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", help="study file (YAML): the trial settings")
    parser.add_argument("--teacher", required=True, help="the study's cached FP teacher folder")
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--host-build", action="store_true")
    parser.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--launched", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank is not None:
        child(args)
        return
    launched = time.time()
    command = [sys.executable, __file__, args.file, "--teacher", args.teacher]
    if args.data_root:
        command += ["--data-root", args.data_root]
    if args.host_build:
        command.append("--host-build")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [
        subprocess.Popen(
            [*command, "--rank", str(r), "--launched", str(launched)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for r in range(args.processes)
    ]
    rows = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            sys.exit(f"a start-up process failed ({proc.returncode})")
        rows.append(json.loads(out.strip().splitlines()[-1]))
    wall = time.time() - launched
    summary = {
        "processes": args.processes,
        "wall_s": wall,
        "median_s": {k: statistics.median(r[k] for r in rows) for k in rows[0]},
        "max_s": {k: max(r[k] for r in rows) for k in rows[0]},
        "median_total_s": statistics.median(sum(r.values()) for r in rows),
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
