"""QAT step cost and sampling throughput of BinaryDM vs its FP twin on one GPU.

    python benchmarks/gpu_qat_step.py --preset ddpm-cifar10 --batch 128 --steps 20 \
        --variants fp,fp-compiled,bdm,bdm-nolrm,bdm-compiled --sample-batch 500 --sample-steps 20

Each variant times full optimizer steps (the training loop's own, ``binarydm.train.step``:
forward, LRM term, EBB penalty, backward, clipping, AdamW) under bf16 autocast (median of
--steps after warm-up). ``bdm`` is the student (W1A4, 2 bases
in the 2 outer levels) plus the frozen teacher's forward plus channel-PCA LRM;
``-compiled`` wraps the student (and the teacher) in torch.compile. Sampling times
DDIM at a fixed batch with binarized weights computed once (freeze_weights). Prints a
markdown table; results in benchmarks/results/gpu_perf.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from binarydm import BinaryDMConfig, binarize_
from binarydm.distill import LowRankMimicking
from binarydm.models import build_unet, count_parameters
from binarydm.quant import LSQQuantizer, quant_layers
from binarydm.train import ddim_sample
from binarydm.train.settings import TrainingSettings
from binarydm.train.step import StepParts, qat_step, teacher_step

KERNEL_KINDS = (
    ("gemm/conv", ("gemm", "conv", "cutlass", "sm90", "cudnn", "xmma", "fprop", "dgrad", "wgrad")),
    ("triton fused", ("triton",)),
    ("nccl", ("nccl",)),
    ("aten elementwise/reduce", ("elementwise", "reduce", "vectorized", "unrolled")),
)


def _device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"


def profile_kernels(step_fn, steps: int, out: str | None) -> None:
    """Where a step's GPU time goes: kernel time by kind, and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    activity = ProfilerActivity.CUDA if DEVICE == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for _ in range(steps):
            step_fn()
        _sync()
    rows = []
    for event in prof.key_averages():
        device_us = (
            getattr(event, "self_device_time_total", 0.0)
            if DEVICE == "cuda"
            else event.self_cpu_time_total
        )
        if device_us > 0:
            rows.append((event.key, device_us / steps / 1000, event.count // steps))
    rows.sort(key=lambda r: -r[1])
    kinds: dict[str, float] = {}
    for key, ms, _ in rows:
        low = key.lower()
        kind = next((k for k, words in KERNEL_KINDS if any(w in low for w in words)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + ms
    lines = [f"GPU kernel time per step: {sum(r[1] for r in rows):.1f} ms"]
    lines += [f"  {kind}: {ms:.1f} ms" for kind, ms in sorted(kinds.items(), key=lambda kv: -kv[1])]
    lines += ["top kernels (ms/step, launches/step):"]
    lines += [f"  {ms:7.2f} {count:5d}  {key[:110]}" for key, ms, count in rows[:25]]
    text = "\n".join(lines)
    print(text, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(text + "\n\n")


# The GPU is what this measures; the CPU path only lets the script be smoke-tested here.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _time_steps(step_fn, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step_fn()
    _sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step_fn()
        _sync()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def make_step(model, lrm, config, x, t, noise, *, graphs: bool = False, fused: bool = False):
    """One training step of ``model``: QAT of ``config`` (its EBB penalty included), or the
    teacher's for an FP variant (``config`` None)."""
    params = [p for p in model.parameters() if p.requires_grad]
    parts = StepParts(
        model,
        torch.optim.AdamW(params, lr=1e-6, fused=fused or None),
        lrm=lrm,
        tau=config.ebb.tau if config is not None and config.ebb.enabled else 0.0,
        grad_clip=TrainingSettings().grad_clip,
        autocast_dtype=torch.bfloat16,
        graph_steps=graphs,
    )
    step_fn = teacher_step if config is None else qat_step
    counter = {"step": 0}

    def step():
        step_fn(parts, x, t, noise, step=counter["step"])
        counter["step"] += 1

    return step


def build_variant(name: str, fp, config: BinaryDMConfig, example):
    """``fp``/``bdm`` plus tokens: ``compiled``, ``cg`` (compiled with CUDA graphs:
    ``mode="reduce-overhead"``), ``nolrm`` (no teacher/LRM), ``composed`` (LSQ as plain
    ops instead of one autograd function), ``tbf16`` (teacher weights cast to bf16 once
    instead of by autocast at every step); ``fused`` (fused AdamW) is read by make_step."""
    LSQQuantizer.implementation = "composed" if "composed" in name else "function"
    tokens = name.split("-")
    mode = "reduce-overhead" if "cg" in tokens else "default"
    compiled = "compiled" in tokens or "cg" in tokens
    if name.startswith("fp"):
        model = copy.deepcopy(fp)
        return (torch.compile(model, mode=mode) if compiled else model), None, None
    teacher = copy.deepcopy(fp).eval().requires_grad_(False)
    if "tbf16" in name:
        teacher = teacher.to(torch.bfloat16)
    student = binarize_(copy.deepcopy(fp), config)
    lrm = None
    if "nolrm" not in name:
        lrm = LowRankMimicking(student, teacher, config.lrm)
    if compiled:
        # Initialise the quantizers (steps, scales) eagerly first: compiling the init pass
        # would trace it once and then recompile the whole UNet when the flags flip.
        with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
            student(*example)
        student = torch.compile(student, mode=mode)
        if lrm is not None:
            lrm.compile_teacher(mode=mode)  # as the training loop does
    return student, teacher, lrm


def sampling_rate(model, batch: int, steps: int, autocast) -> float:
    ddim_sample(model, batch, steps=2, seed=0, batch_size=batch, autocast_dtype=autocast)
    _sync()
    start = time.perf_counter()
    ddim_sample(model, batch, steps=steps, seed=1, batch_size=batch, autocast_dtype=autocast)
    _sync()
    return batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="ddpm-cifar10")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--variants", default="fp,fp-compiled,bdm,bdm-nolrm,bdm-compiled")
    parser.add_argument("--sample-batch", type=int, default=500)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--json", default=None)
    parser.add_argument("--profile", default="", help="variants to profile (comma list)")
    parser.add_argument("--profile-out", default=None, help="append the profiles to this file")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    device = torch.device(DEVICE)
    torch.manual_seed(0)
    fp = build_unet(args.preset).to(device)
    res = fp.config.sample_size
    x = torch.randn(args.batch, fp.config.in_channels, res, res, device=device)
    t = torch.randint(0, 1000, (args.batch,), device=device)
    noise = torch.randn_like(x)
    config = BinaryDMConfig()
    print(
        f"{_device_name()} | {args.preset} {count_parameters(fp)} params | "
        f"batch {args.batch} | bf16 autocast | torch {torch.__version__}",
        flush=True,
    )
    results = {}
    for name in args.variants.split(","):
        start = time.perf_counter()
        model, teacher, lrm = build_variant(name, fp, config, (x, t))
        tokens = name.split("-")
        warmup = args.warmup + (3 if "compiled" in tokens or "cg" in tokens else 0)
        step_fn = make_step(
            model,
            lrm,
            None if name.startswith("fp") else config,
            x, t, noise,
            graphs="cg" in tokens,
            fused="fused" in tokens,
        )  # fmt: skip
        try:
            ms = _time_steps(step_fn, args.steps, warmup)
        except Exception as exc:  # one variant failing must not lose the others' numbers
            print(f"{name}: FAILED {type(exc).__name__}: {exc}".splitlines()[0], flush=True)
            del model, teacher, lrm, step_fn
            continue
        results[name] = ms
        print(
            f"{name}: {ms:.1f} ms/step ({args.batch / ms * 1000:.0f} img/s), "
            f"setup+warmup {time.perf_counter() - start:.0f} s",
            flush=True,
        )
        if name in args.profile.split(","):
            print(f"profile of {name}:", flush=True)
            if args.profile_out:
                with open(args.profile_out, "a") as f:
                    f.write(f"## {name} ({_device_name()})\n")
            profile_kernels(step_fn, 5, args.profile_out)
        del model, teacher, lrm, step_fn
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    base = results.get("fp")
    print("\n| variant | ms/step | images/s | x FP eager |\n| --- | --- | --- | --- |")
    for name, ms in results.items():
        ratio = f"{ms / base:.2f}" if base else "-"
        print(f"| {name} | {ms:.1f} | {args.batch / ms * 1000:.0f} | {ratio} |")
    sampling = {}
    if args.sample_batch:
        bf16 = torch.bfloat16
        fp_eval = copy.deepcopy(fp).eval()
        sampling["fp"] = sampling_rate(fp_eval, args.sample_batch, args.sample_steps, bf16)
        student = binarize_(copy.deepcopy(fp), config).eval()
        with torch.no_grad():
            student(x[:2], t[:2])  # initialise quantizers
        for _, layer in quant_layers(student):
            layer.freeze_weights()
        sampling["bdm-frozen"] = sampling_rate(student, args.sample_batch, args.sample_steps, bf16)
        compiled = torch.compile(student)
        sampling["bdm-frozen-compiled"] = sampling_rate(
            compiled, args.sample_batch, args.sample_steps, bf16
        )
        print(f"\nDDIM-{args.sample_steps} sampling, batch {args.sample_batch}, bf16:")
        for name, rate in sampling.items():
            print(f"| {name} | {rate:.0f} images/s | x FP {rate / sampling['fp']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "train_ms": results,
                    "sample_images_per_s": sampling,
                    "args": vars(args),
                    "device": _device_name(),
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
