"""Ray Train data-parallel scaling of BinaryDM QAT (and FP training) on 1..N GPUs of a host.

    python benchmarks/gpu_scaling.py --gpus 1,2 --modes qat,teacher --steps 300 \
        --batch 128 --data-root DIR --json scaling.json

Runs the real training loop (``binarydm.train._loop.train_loop_per_worker``) under
``TorchTrainer`` with N workers, one GPU each, at a fixed per-GPU batch (weak scaling),
on CIFAR-10 and the ``ddpm-cifar10`` UNet (a randomly initialised teacher: the step cost
does not depend on what the teacher learned). QAT is the default BinaryDM config (W1A4,
2 bases in the outer levels, LRM, EMA) without the final evaluation; ``--compile-mode``
turns on ``training.compile`` (compilation falls in the warm-up reports, not the rate).
Throughput is read from the workers' own reports (images and ``train_s`` between the
first and last report after ``--skip`` warm-up reports), so Ray start-up and NCCL set-up
are not in it; they are printed separately as the run's wall time.
Efficiency = throughput(N) / (N x throughput(1)).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from ray.train.v2.api.callback import UserCallback


class ReportLog(UserCallback):
    """Appends rank 0's reports (step, train_s) to a JSONL file as Ray Train receives them.

    The callback runs in the Train controller actor, not in this process: a file is how
    its records come back.
    """

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if metrics and "step" in metrics[0] and not metrics[0].get("final"):
            record = {k: metrics[0][k] for k in ("step", "train_s", "loss")}
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def reports(self) -> list[dict]:
        text = Path(self.path).read_text() if Path(self.path).exists() else ""
        return [json.loads(line) for line in text.splitlines()]


def steady_throughput(reports: list[dict], per_step_images: int, skip: int) -> float:
    """Images/s between the ``skip``-th report and the last one."""
    if len(reports) < skip + 2:
        raise SystemExit(f"only {len(reports)} reports: raise --steps or lower --log-every")
    first, last = reports[skip], reports[-1]
    return (last["step"] - first["step"]) * per_step_images / (last["train_s"] - first["train_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", default="1,2", help="worker counts, one GPU each")
    parser.add_argument("--modes", default="qat,teacher", help="qat (BinaryDM), teacher (FP)")
    parser.add_argument("--preset", default="ddpm-cifar10")
    parser.add_argument("--batch", type=int, default=128, help="per-GPU batch")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--skip", type=int, default=2, help="warm-up reports left out")
    parser.add_argument("--cpus-per-worker", type=float, default=4)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--compile-mode",
        default="none",
        choices=["none", "default", "reduce-overhead"],
        help="training.compile with this torch.compile mode (QAT only; none = eager)",
    )
    args = parser.parse_args()

    import ray
    import torch

    from binarydm.models import build_unet
    from binarydm.train import make_trainer
    from binarydm.train.settings import TrialSettings

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bdm-scaling-"))
    teacher_dir = work / "teacher"
    if not (teacher_dir / "config.json").exists():
        torch.manual_seed(0)
        build_unet(args.preset, in_channels=3, sample_size=32).save_pretrained(teacher_dir)
    ray.init(include_dashboard=False)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    rows = []
    for mode in args.modes.split(","):
        for n in [int(g) for g in args.gpus.split(",")]:
            settings = TrialSettings.from_dict(
                {
                    "data": {"source": "cifar10", "resolution": 32, "channels": 3},
                    "teacher": {
                        "preset": args.preset,
                        "steps": args.steps,
                        "batch_size": args.batch,
                    },
                    "training": {
                        "steps": args.steps,
                        "batch_size": args.batch,
                        "lr": 2e-5,
                        "ema_decay": 0.999,
                        "log_every": args.log_every,
                        "checkpoint_every": args.steps,
                        "compile": args.compile_mode != "none",
                        "compile_mode": "default"
                        if args.compile_mode == "none"
                        else args.compile_mode,
                    },
                    "workers": {
                        "num_workers": n,
                        "use_gpu": torch.cuda.is_available(),
                        "cpus_per_worker": args.cpus_per_worker,
                    },
                }
            )
            name = f"scaling-{mode}-{n}gpu-{int(time.time())}"
            log = ReportLog(work / f"{name}.jsonl")
            trainer = make_trainer(
                settings,
                mode=mode,
                name=name,
                storage_path=str(work / "ray_results"),
                teacher_dir=str(teacher_dir) if mode == "qat" else None,
                data_root=args.data_root or os.environ.get("BINARYDM_DATA_ROOT"),
                cache_dir=str(work / "cache"),
                callbacks=[log],
                evaluate=False,
            )
            start = time.perf_counter()
            result = trainer.fit()
            wall = time.perf_counter() - start
            if result.error is not None:
                raise SystemExit(f"{mode} on {n} GPUs failed: {result.error}")
            rate = steady_throughput(log.reports(), args.batch * n, args.skip)
            rows.append({"mode": mode, "gpus": n, "images_per_s": rate, "wall_s": wall})
            if args.json:  # written after every run: a call's time limit keeps what ran
                Path(args.json).write_text(
                    json.dumps({"device": device, "args": vars(args), "rows": rows}, indent=2)
                )
            print(
                f"{mode} {n} GPU(s): {rate:.0f} images/s "
                f"({args.batch * n / rate * 1000:.1f} ms/step), run wall {wall:.0f} s",
                flush=True,
            )
    print(f"\n{device} | {args.preset} | per-GPU batch {args.batch} | bf16 autocast")
    print("| mode | GPUs | images/s | ms/step | efficiency |\n| --- | --- | --- | --- | --- |")
    for row in rows:
        base = next(
            r
            for r in rows
            if r["mode"] == row["mode"]
            and r["gpus"] == min(x["gpus"] for x in rows if x["mode"] == row["mode"])
        )
        row["efficiency"] = row["images_per_s"] / (
            row["gpus"] / base["gpus"] * base["images_per_s"]
        )
        ms = args.batch * row["gpus"] / row["images_per_s"] * 1000
        print(
            f"| {row['mode']} | {row['gpus']} | {row['images_per_s']:.0f} | {ms:.1f} | "
            f"{row['efficiency']:.3f} |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"device": device, "args": vars(args), "rows": rows}, indent=2)
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
