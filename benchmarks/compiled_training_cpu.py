"""Does ``training.compile`` train the same model as eager? Loss per step, on the CPU.

    python benchmarks/compiled_training_cpu.py step --backend inductor --autocast none
    python benchmarks/compiled_training_cpu.py step --backend inductor --autocast bf16
    python benchmarks/compiled_training_cpu.py loop        # fit_qat, aot_eager (needs Ray)

``step``: the QAT step (``binarydm.train.step.qat_step``) of a micro 1-bit student (a
2-level UNet, 1 basis, no EBB, ``--activation-bits``, AdamW lr 1e-3, grad clip 1) from one
state, 12 steps eager and 12 with the forward under ``torch.compile`` from the second
step, as the training loop compiles; prints both losses and their difference per step.

``loop``: the real training loop (``fit_qat`` on the tests' tiny MNIST settings, 12
steps, a local Ray) eager and with ``training.compile`` (``aot_eager``), for the 1-bit
baseline at A32 and BinaryDM v5 (EBB switch, LRM); prints each run's final loss.
Written for issue 18 (benchmarks/results/gpu_perf.md): a GPU study trained worse compiled.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path


def micro_student(activation_bits: int):
    """compile_cache_cpu's micro UNet as a 1-basis baseline at ``activation_bits``."""
    from binarydm import BinaryDMConfig

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from compile_cache_cpu import micro_student as micro_unet

    config = BinaryDMConfig.baseline()
    activation = dataclasses.replace(config.activation, bits=activation_bits)
    return micro_unet(dataclasses.replace(config, activation=activation))


def step_losses(backend: str | None, autocast: str, activation_bits: int, steps: int = 12):
    """Noise losses of ``steps`` QAT steps; ``backend`` None: eager throughout."""
    import torch

    from binarydm.train.step import StepParts, qat_step

    student = micro_student(activation_bits)
    generator = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.randn(8, 1, 8, 8, generator=generator),
            torch.randint(0, 1000, (8,), generator=generator),
            torch.randn(8, 1, 8, 8, generator=generator),
        )
        for _ in range(steps)
    ]
    parts = StepParts(
        student,
        torch.optim.AdamW(student.parameters(), lr=1e-3),
        autocast_dtype=torch.bfloat16 if autocast == "bf16" else None,
        grad_clip=1.0,
    )
    losses = []
    for step, (x_t, t, noise) in enumerate(batches):
        if backend is not None and step == 1:  # the loop compiles after the first step
            torch._functorch.config.autograd_cache_allow_custom_autograd_functions = True
            parts.forward_model = torch.compile(student, backend=backend)
        losses.append(qat_step(parts, x_t, t, noise, step=step).loss_noise)
    return losses


def loop_losses() -> dict[str, float]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import ray
    from bdm_support import fit_tiny, tiny_settings

    from binarydm.train._runner import ensure_teacher

    root = tempfile.mkdtemp(prefix="bdm-compiled-")
    workspace = {
        "data_root": os.environ.get("BINARYDM_DATA_ROOT", "../shared/data"),
        "cache_dir": os.environ.get("BINARYDM_CACHE_DIR", f"{root}/cache"),
        "storage": f"{root}/ray",
    }
    ray.init(num_cpus=2, include_dashboard=False)
    teacher = ensure_teacher(
        tiny_settings(),
        storage_path=workspace["storage"],
        data_root=workspace["data_root"],
        cache_dir=workspace["cache_dir"],
    )
    rows = {
        "baseline_a32": {
            "method.weight.bases": 1,
            "method.ebb.enabled": False,
            "method.lrm.enabled": False,
            "method.progressive.stage_steps": 0,
            "method.activation.bits": 32,
        },
        "binarydm_v5": {"method.progressive.stage_steps": 0},
    }
    out = {}
    for row, options in rows.items():
        for compiled in (False, True):
            settings = tiny_settings(
                **options,
                **{
                    "training.steps": 12,
                    "training.checkpoint_every": 12,
                    "training.compile": compiled,
                    "training.compile_backend": "aot_eager",
                },
            )
            name = f"{row}-{'compiled' if compiled else 'eager'}"
            result = fit_tiny(settings, name, workspace, teacher, evaluate=False)
            out[name] = float(result.metrics["loss"])
            print(name, f"{out[name]:.8f}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("step", "loop"))
    parser.add_argument("--backend", default="inductor", choices=("inductor", "aot_eager"))
    parser.add_argument("--autocast", default="none", choices=("none", "bf16"))
    parser.add_argument("--activation-bits", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.mode == "loop":
        report = loop_losses()
    else:
        eager = step_losses(None, args.autocast, args.activation_bits)
        compiled = step_losses(args.backend, args.autocast, args.activation_bits)
        for step, (a, b) in enumerate(zip(eager, compiled, strict=True)):
            print(f"step {step:2d}  eager {a:.6f}  compiled {b:.6f}  |diff| {abs(a - b):.2e}")
        worst = max(abs(a - b) for a, b in zip(eager, compiled, strict=True))
        print(f"largest |diff| {worst:.2e} ({args.backend}, autocast {args.autocast})")
        report = {"eager": eager, "compiled": compiled, "max_abs_diff": worst, **vars(args)}
        report.pop("json")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
