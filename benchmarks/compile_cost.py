"""What compiling the QAT step costs a trial: whole model or block by block, cold or warm cache.

    python benchmarks/compile_cost.py --preset ddpm-cifar10 --batch 128 \
        --runs regional,regional,whole,whole --json compile_cost.json      # the GPU
    python benchmarks/compile_cost.py --preset tiny --batch 8 --backend aot_eager \
        --runs regional,whole                                              # a CPU smoke run

Issue 18 (benchmarks/results/gpu_perf.md): in a compiled GPU study a BinaryDM trial spent
10-15 minutes compiling, four trials at once, which ate the 3-4.6x faster steps. This
measures one trial's compile alone. Each run is a fresh Python process (as a trial is)
that builds the study's BinaryDM v5 student of ``--preset`` (freshly initialised weights:
what is compiled does not depend on their values) at W``--activation-bits``, its FP
teacher and LRM, takes one eager step (which initialises the quantizers), switches the
LSQ quantizers to their plain-ops form, as the training loop does
(``binarydm.train._loop._compile``), then compiles:

- ``whole``: the student and the teacher each as one ``torch.compile`` (the loop's
  ``training.compile``);
- ``regional``: every ``ResnetBlock2D`` and ``Attention`` of both, each on its own
  (``nn.Module.compile``): a block class at one shape and configuration is traced once and
  its graph reused by its twins, and the FX graph cache can serve it to other trials.

It reports the first compiled step's seconds (compilation, or loading from the caches,
plus one step), the median of ``--steps`` further steps, the loss and torch's cache and
graph counters. Runs of one scope share an inductor cache directory under ``--workdir``:
the first of a scope is cold, the next ones warm (what a second trial of the same graph
finds on one machine). ``--reuse-cache`` accepts a workdir whose caches an earlier call
filled (a GPU call is limited to 10 minutes: the cold run in one call, the warm one in
the next), and every run of it counts as warm. ``--save-artifacts FILE`` writes the
caches' entries a run created or hit (``torch.compiler.save_cache_artifacts``, the
"mega-cache") after its first compiled step; ``--load-artifacts FILE`` hot-loads such a
file (``load_cache_artifacts``) before compiling, into the run's own, possibly empty,
cache: a fresh machine's trial started from a file carried with the job rather than from
a cold cache. ``--compile-cache DIR`` does the same through the platform's own calls
(``binarydm.train._compile_cache``, what ``training.compile_cache`` runs): every
``*.megacache`` file of DIR loaded before compiling, what the run compiled saved there
after its first compiled step. ``--compile-threads`` caps inductor's
compile workers (default: torch's, one per CPU). Results are written after every run; a
run stopped at ``--timeout`` is recorded with the stages it reached (``stages_s``: built,
eager step, compiling, first compiled step, in seconds from its start) and the runs of
its scope after it are skipped (their cache would be partial).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compile_cache_cpu import COUNTER_GROUPS, cache_counts  # noqa: E402

SCOPES = ("whole", "regional")


def _student_teacher_lrm(preset: str, activation_bits: int, device: str):
    import copy
    import dataclasses

    import torch

    from binarydm import binarize_
    from binarydm.distill import LowRankMimicking
    from binarydm.models import build_unet
    from binarydm.quant.config import RECIPES

    torch.manual_seed(0)
    fp = build_unet(preset).to(device)
    config = RECIPES["v5"]()
    config = dataclasses.replace(
        config, activation=dataclasses.replace(config.activation, bits=activation_bits)
    )
    teacher = copy.deepcopy(fp).eval().requires_grad_(False)
    student = binarize_(fp, config).train()
    return student, teacher, LowRankMimicking(student, teacher, config.lrm), config


def _compile_regionally(model, options: dict) -> int:
    """Compile each ResnetBlock2D and Attention of ``model`` in place; how many."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    blocks = [m for m in model.modules() if isinstance(m, (ResnetBlock2D, Attention))]
    for block in blocks:
        block.compile(**options)
    return len(blocks)


def child(args) -> dict:
    """One fresh process's compile of the step; what it reports."""
    import torch
    from torch._dynamo.utils import counters

    from binarydm.quant import use_composed_quantizers_
    from binarydm.train.settings import TrainingSettings
    from binarydm.train.step import StepParts, qat_step

    if args.compile_threads:
        torch._inductor.config.compile_threads = args.compile_threads
    # Regional compilation traces one frame per block instance: more than the default
    # limit of 8 recompiles of one code object (the blocks' forward) is expected.
    torch._dynamo.config.cache_size_limit = 256
    torch._dynamo.config.accumulated_cache_size_limit = 4096
    device = "cuda" if torch.cuda.is_available() else "cpu"
    student, teacher, lrm, config = _student_teacher_lrm(args.preset, args.activation_bits, device)
    parts = StepParts(
        student,
        torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-6),
        lrm=lrm,
        tau=config.ebb.tau,
        grad_clip=TrainingSettings().grad_clip,
        autocast_dtype=torch.bfloat16 if device == "cuda" else None,
    )
    size = student.config.sample_size
    channels = student.config.in_channels
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, channels, size, size, generator=generator).to(device)
    t = torch.randint(0, 1000, (args.batch,), generator=generator).to(device)
    noise = torch.randn(args.batch, channels, size, size, generator=generator).to(device)

    def step(number: int) -> float:
        start = time.perf_counter()
        losses = qat_step(parts, x, t, noise, step=number)
        if device == "cuda":
            torch.cuda.synchronize()
        step.loss = losses.loss
        return time.perf_counter() - start

    _stage("built")
    step(0)  # eager: initialises the quantizers, as the loop does before compiling
    _stage("eager step")
    use_composed_quantizers_(student)
    loaded = None
    if args.compile_cache:
        from binarydm.train._compile_cache import load_compile_cache

        loaded = load_compile_cache(args.compile_cache)
        _stage("compile cache loaded")
    if args.load_artifacts:
        started = time.perf_counter()
        info = torch.compiler.load_cache_artifacts(Path(args.load_artifacts).read_bytes())
        loaded = {"load_s": time.perf_counter() - started, "entries": _entry_counts(info)}
        _stage("artifacts loaded")
    options = {"backend": args.backend}
    blocks = 0
    if args.scope == "whole":
        parts.forward_model = torch.compile(student, **options)
        lrm.compile_teacher(**options)
    else:
        blocks = _compile_regionally(student, options) + _compile_regionally(teacher, options)
    _stage("compiling")
    first = step(1)
    _stage("first compiled step")
    saved = None
    if args.compile_cache:
        from binarydm.train._compile_cache import save_compile_cache

        started = time.perf_counter()
        path = save_compile_cache(args.compile_cache)
        saved = {
            "save_s": time.perf_counter() - started,
            "file": str(path) if path else None,  # None: nothing new (every graph loaded)
            "bytes": path.stat().st_size if path else 0,
        }
    if args.save_artifacts:
        started = time.perf_counter()
        # None when the run made or hit no cache entry (e.g. the aot_eager backend).
        blob, info = torch.compiler.save_cache_artifacts() or (b"", None)
        Path(args.save_artifacts).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save_artifacts).write_bytes(blob)
        saved = {
            "save_s": time.perf_counter() - started,
            "bytes": len(blob),
            "entries": _entry_counts(info),
        }
    steady = [step(2 + i) for i in range(args.steps)]
    return {
        "scope": args.scope,
        "blocks_compiled": blocks,
        "first_compiled_step_s": first,
        "median_step_s": statistics.median(steady),
        "loss": step.loss,
        "counters": {group: dict(counters[group]) for group in COUNTER_GROUPS},
        "artifacts_saved": saved,
        "artifacts_loaded": loaded,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
    }


def _entry_counts(info) -> dict[str, int]:
    """How many entries of each cache (inductor, AOTAutograd, ...) a mega-cache file holds."""
    if info is None:
        return {}
    return {kind: len(keys) for kind, keys in info.artifacts.items() if keys}


_STARTED = time.perf_counter()


def _stage(name: str) -> None:
    """A progress line the parent keeps even when it stops the run at its time limit."""
    print(f"STAGE {name} {time.perf_counter() - _STARTED:.1f}", flush=True)


def _stages(output) -> dict[str, float]:
    """The ``STAGE`` lines of a child's output: seconds since it started, by stage."""
    if isinstance(output, bytes):
        output = output.decode(errors="replace")
    stages = {}
    for line in (output or "").splitlines():
        if line.startswith("STAGE "):
            name, seconds = line[len("STAGE ") :].rsplit(" ", 1)
            stages[name] = float(seconds)
    return stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="ddpm-cifar10")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--activation-bits", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--backend", default="inductor", choices=("inductor", "aot_eager"))
    parser.add_argument("--compile-threads", type=int, default=0)
    parser.add_argument("--runs", default="regional,regional,whole,whole")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run")
    parser.add_argument("--workdir", default="/tmp/compile-cost")
    parser.add_argument(
        "--reuse-cache",
        action="store_true",
        help="accept caches an earlier call filled in --workdir (every run is then warm)",
    )
    parser.add_argument("--save-artifacts", default=None, metavar="FILE")
    parser.add_argument("--load-artifacts", default=None, metavar="FILE")
    parser.add_argument("--compile-cache", default=None, metavar="DIR")
    parser.add_argument("--json", default=None)
    parser.add_argument("--scope", choices=SCOPES, help=argparse.SUPPRESS)  # a child run
    args = parser.parse_args()
    if args.scope is not None:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    runs = args.runs.split(",")
    unknown = sorted(set(runs) - set(SCOPES))
    if unknown:
        parser.error(f"--runs: unknown scope(s) {unknown}; choose from {list(SCOPES)}")
    if args.steps < 1:
        parser.error(f"--steps {args.steps}: at least 1 step is timed after the compiled one")
    if args.load_artifacts and not Path(args.load_artifacts).is_file():
        parser.error(f"--load-artifacts {args.load_artifacts}: no such file")
    if args.compile_cache and (args.load_artifacts or args.save_artifacts):
        parser.error("--compile-cache replaces --load-artifacts/--save-artifacts: give one")
    workdir = Path(args.workdir)
    filled = {scope for scope in set(runs) if (workdir / scope).exists()}
    if filled and not args.reuse_cache:
        parser.error(
            f"{sorted(filled)} exist in {workdir}: give a --workdir whose caches are empty, "
            "or --reuse-cache to time them warm"
        )
    results = []
    timed_out: set[str] = set()
    for index, scope in enumerate(runs):
        warm = scope in runs[:index] or scope in filled
        carried = args.load_artifacts or (args.compile_cache and any(
            Path(args.compile_cache).glob("*.megacache")))  # fmt: skip
        cache = "warm" if warm else ("from artifacts" if carried else "cold")
        if scope in timed_out:
            continue
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(workdir / scope / "inductor")}
        command = [sys.executable, __file__, "--scope", scope]
        for flag in ("preset", "batch", "activation_bits", "steps", "backend", "compile_threads"):
            command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        for flag in ("save_artifacts", "load_artifacts", "compile_cache"):
            if getattr(args, flag):
                command += [f"--{flag.replace('_', '-')}", str(Path(getattr(args, flag)).resolve())]
        start = time.perf_counter()
        # Its own process group: at the time limit inductor's compile workers are stopped
        # with it, not left compiling into the next timed run.
        child_process = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )  # fmt: skip
        try:
            stdout, stderr = child_process.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child_process.pid, signal.SIGKILL)
            stdout, _ = child_process.communicate()
            # Its later runs would find a partial cache: the next scope runs instead.
            timed_out.add(scope)
            stages = _stages(stdout)
            cut = {"timed_out_after_s": args.timeout, "stages_s": stages}
            results.append({"scope": scope, "warm": warm, **cut})
            print(
                f"{scope} ({cache}): over {args.timeout:.0f} s "
                f"(stages reached, seconds from its start: {stages})",
                flush=True,
            )
            _write(args, results)
            continue
        lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
        if child_process.returncode != 0 or not lines:
            code = child_process.returncode
            raise SystemExit(f"run {scope} failed ({code}):\n{stderr[-4000:]}")
        result = {**json.loads(lines[-1][len("RESULT ") :]), "warm": warm}
        result["stages_s"] = _stages(stdout)
        result["process_s"] = time.perf_counter() - start
        results.append(result)
        aot, inductor = result["counters"]["aot_autograd"], result["counters"]["inductor"]
        print(
            f"{scope} ({cache}, {result['blocks_compiled']} blocks): "
            f"first compiled step {result['first_compiled_step_s']:.1f} s, then "
            f"{result['median_step_s'] * 1000:.1f} ms/step, process {result['process_s']:.1f} s"
            f" | AOTAutograd {cache_counts(aot, 'autograd_cache_')} | FX graph "
            f"{cache_counts(inductor, 'fxgraph_cache_')} | graphs "
            f"{result['counters']['stats'].get('unique_graphs', 0)} | loss {result['loss']:.6g}",
            flush=True,
        )
        _write(args, results)


def _write(args, results: list) -> None:
    if args.json:
        document = {"args": vars(args), "machine": _machine(), "runs": results}
        Path(args.json).write_text(json.dumps(document, indent=2))


def _machine() -> dict:
    """What ran the runs, recorded even when every run was stopped at its limit."""
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"torch": torch.__version__, "gpu": gpu, "cpus": os.cpu_count()}


if __name__ == "__main__":
    main()
