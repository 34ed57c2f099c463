"""Does a fresh process reuse the compiled QAT step? AOTAutograd's cache and our autograd.Functions.

    python benchmarks/compile_cache_cpu.py --workdir /tmp/compile-cache --json cache.json

The training loop compiles the student's forward (``training.compile``) and AOTAutograd
differentiates it; the student holds two custom ``torch.autograd.Function``s
(``binarydm.quant.lsq._LSQFakeQuant``, ``binarydm.quant.ste._SignSTE``). AOTAutograd's
cache refuses graphs that contain one unless
``torch._functorch.config.autograd_cache_allow_custom_autograd_functions`` is set, so a
fresh trial process re-traces and re-partitions the whole forward and backward even when
inductor's FX graph cache holds the compiled kernels.

Each run below is a fresh Python process compiling the same step (a micro BinaryDM
student: 2 levels, W1A4, the training loop's ``qat_step`` with the compiled forward,
inductor, CPU), all sharing one inductor cache directory:

1. ``cold``: flag off, empty cache;
2. ``warm-off``: flag off again;
3. ``warm-on-first``: flag on, the first run with it (nothing in AOTAutograd's cache yet);
4. ``warm-on``: flag on again;
5. ``changed-backward``: flag on, ``_LSQFakeQuant.backward`` altered (the step's
   gradient doubled): a correct cache must miss here, and the gradients differ.

Each run reports torch's cache counters, the seconds of the first compiled step
(compilation, or loading from the caches, plus one step) and of the next one, and sums
of the loss and of the gradients of every parameter (runs 1-4 must agree exactly).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RUNS = (
    ("cold", False, False),
    ("warm-off", False, False),
    ("warm-on-first", True, False),
    ("warm-on", True, False),
    ("changed-backward", True, True),
)
COUNTER_GROUPS = ("aot_autograd", "inductor", "stats")


def micro_student(config=None):
    """A 2-level UNet (about 42k parameters), binarized with ``config`` (default: the
    default BinaryDM config); the same weights for every call."""
    import torch
    from diffusers import UNet2DModel

    from binarydm import BinaryDMConfig, binarize_

    torch.manual_seed(0)
    fp = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
    )
    return binarize_(fp, config or BinaryDMConfig())


def double_lsq_step_gradient() -> None:
    """Replace ``_LSQFakeQuant.backward`` by one whose step gradient is doubled."""
    from binarydm.quant.lsq import _LSQFakeQuant

    original = _LSQFakeQuant.backward

    def backward(ctx, grad):
        grad_x, grad_step, *rest = original(ctx, grad)
        return (grad_x, grad_step * 2, *rest)

    _LSQFakeQuant.backward = staticmethod(backward)


def child(allow_custom: bool, change_backward: bool) -> dict:
    """One fresh process's compile of the step; what it reports."""
    import torch
    from torch._dynamo.utils import counters

    from binarydm.train.settings import TrainingSettings
    from binarydm.train.step import StepParts, qat_step

    torch._functorch.config.autograd_cache_allow_custom_autograd_functions = allow_custom
    if change_backward:
        double_lsq_step_gradient()
    student = micro_student()
    parts = StepParts(
        student,
        torch.optim.SGD(student.parameters(), lr=0.0),  # lr 0: every step sees the same weights
        tau=student.binarydm_config.ebb.tau,
        grad_clip=TrainingSettings().grad_clip,
    )
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 8, 8, generator=generator)
    t = torch.randint(0, 1000, (4,), generator=generator)
    noise = torch.randn(4, 1, 8, 8, generator=generator)
    qat_step(parts, x, t, noise, step=0)  # eager: initialises the quantizers, as the loop does
    parts.forward_model = torch.compile(student, backend="inductor")
    seconds = []
    for step in (1, 2):
        start = time.perf_counter()
        losses = qat_step(parts, x, t, noise, step=step)
        seconds.append(time.perf_counter() - start)
    grads = [p.grad.double().sum().item() for p in student.parameters() if p.grad is not None]
    return {
        "first_compiled_step_s": seconds[0],
        "next_step_s": seconds[1],
        "loss": losses.loss,
        "grad_sum": sum(grads),
        "grad_abs_sum": sum(abs(g) for g in grads),
        "counters": {group: dict(counters[group]) for group in COUNTER_GROUPS},
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/compile-cache")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        allow_custom, change_backward = (flag == "1" for flag in args.child.split(","))
        print("RESULT " + json.dumps(child(allow_custom, change_backward)), flush=True)
        return
    cache = Path(args.workdir) / "inductor"
    if cache.exists():
        raise SystemExit(f"{cache} exists: give a --workdir whose cache is empty")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    results = {}
    for name, allow_custom, change_backward in RUNS:
        flags = f"{int(allow_custom)},{int(change_backward)}"
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, __file__, "--child", flags],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            raise SystemExit(f"run {name} failed ({done.returncode}):\n{done.stderr[-4000:]}")
        result = json.loads(lines[-1][len("RESULT ") :])
        result["process_s"] = time.perf_counter() - start
        results[name] = result
        aot, inductor = result["counters"]["aot_autograd"], result["counters"]["inductor"]
        print(
            f"{name}: first compiled step {result['first_compiled_step_s']:.1f} s, next "
            f"{result['next_step_s']:.2f} s, process {result['process_s']:.1f} s | "
            f"AOTAutograd {cache_counts(aot, 'autograd_cache_')} | "
            f"FX graph {cache_counts(inductor, 'fxgraph_cache_')} | "
            f"loss {result['loss']:.9g} grad sum {result['grad_sum']:.9g}",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def cache_counts(group: dict, prefix: str) -> str:
    """torch's cache counters of one group whose names start with ``prefix``, as text."""
    found = {key[len(prefix) :]: value for key, value in group.items() if key.startswith(prefix)}
    return ", ".join(f"{key} {value}" for key, value in sorted(found.items())) or "none"


if __name__ == "__main__":
    main()
