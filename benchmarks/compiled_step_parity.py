"""Where does ``training.compile`` change training? Gradients and losses, eager vs compiled.

    python benchmarks/compiled_step_parity.py --device cuda --teacher PATH --json parity.json
    python benchmarks/compiled_step_parity.py --device cpu        # the micro student

A GPU study trained worse with ``training.compile`` (inductor): 18 % higher loss from its
first compiled steps (benchmarks/results/gpu_perf.md, issue 18), where the CPU matched
eager exactly (``compiled_training_cpu.py``). This bisects it on one device: the student
(``--recipe``, ``--activation-bits``; the shared teacher binarized, or the micro UNet) is
initialised by one eager step (the training loop compiles from its second step), then
for every variant (backend ``eager``/``aot_eager``/``inductor`` x autocast ``bf16``/
``none`` x AOTAutograd's custom-Function cache flag) a copy of it:

1. computes the noise loss and every gradient on one batch through the compiled forward,
   compared with the eager forward's on the same copy (``grad_rel``: the norm of the
   gradient difference over the eager gradient's norm, for all parameters and per kind:
   weights and biases, LSQ step sizes, the binarizer scales; ``loss_diff``), and each
   of the two against the fp32 eager gradient (which is nearer the exact one);
2. trains ``--steps`` QAT steps (``binarydm.train.step.qat_step``, AdamW, grad clip 1) on
   the same batches, reporting the mean noise loss of the last ten against eager's.

``eager`` through ``torch.compile(backend="eager")`` is Dynamo alone (the graph capture);
the eager variant run twice gives the device's own run-to-run spread (GPU atomics).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

KINDS = ("weight", "step", "scale", "other")


def _kind(name: str) -> str:
    """Parameter group of a student parameter, by its name."""
    leaf = name.rsplit(".", 1)[-1]
    return {"step": "step", "scales": "scale", "weight": "weight", "bias": "weight"}.get(
        leaf, "other"
    )


def build_student(args):
    """The binarized student on ``args.device`` and a batch shape for it."""

    from binarydm import binarize_
    from binarydm.quant.config import RECIPES

    config = RECIPES[args.recipe]()
    activation = dataclasses.replace(config.activation, bits=args.activation_bits)
    config = dataclasses.replace(config, activation=activation)
    if args.teacher:
        from binarydm.models import load_unet

        fp = load_unet(args.teacher).float()
        shape = (args.batch, fp.config.in_channels, fp.config.sample_size, fp.config.sample_size)
        student = binarize_(fp, config)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from compile_cache_cpu import micro_student

        student = micro_student(config)
        shape = (args.batch, 1, 8, 8)
    return student.to(args.device).train(), shape


def batches(shape, count: int, device: str):
    """``count`` (x_t, t, noise) batches: smooth images noised by diffusers' DDPM schedule."""
    import torch

    from binarydm.train._diffusion import noise_scheduler, noisy_batch

    generator = torch.Generator().manual_seed(7)
    scheduler = noise_scheduler()
    out = []
    for _ in range(count):
        # Low-frequency images in [-1, 1] (upsampled noise), closer to data than white noise.
        coarse = torch.rand(shape[0], shape[1], 4, 4, generator=generator) * 2 - 1
        clean = torch.nn.functional.interpolate(coarse, size=shape[2:], mode="bilinear")
        x_t, t, noise = noisy_batch(clean, scheduler, generator)
        out.append((x_t.to(device), t.to(device), noise.to(device)))
    return out


def _loss(model, x_t, t, noise, autocast: bool):
    import torch

    with torch.autocast(x_t.device.type, dtype=torch.bfloat16, enabled=autocast):
        pred = model(x_t, t).sample
    return torch.nn.functional.mse_loss(pred.float(), noise.float())


def _grads(model, forward, batch, autocast: bool):
    model.zero_grad(set_to_none=True)
    loss = _loss(forward, *batch, autocast)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return float(loss), grads


def _grad_rel(eager: dict, other: dict) -> dict[str, float]:
    import torch

    out = {}
    for kind in ("all", *KINDS):
        names = [n for n in eager if kind == "all" or _kind(n) == kind]
        if not names:
            continue
        diff = torch.sqrt(sum(((other[n] - eager[n]).float() ** 2).sum() for n in names))
        norm = torch.sqrt(sum((eager[n].float() ** 2).sum() for n in names))
        out[kind] = float(diff / norm.clamp_min(1e-30))
    missing = sorted(set(eager) ^ set(other))
    if missing:
        out["missing"] = missing[:5]
    return out


def _worst(eager: dict, other: dict, top: int) -> list[tuple[str, float, float]]:
    """The ``top`` parameters whose compiled gradient is furthest from eager's, relatively:
    (name, relative difference, eager gradient norm)."""
    rows = []
    for name, g in eager.items():
        norm = float(g.float().norm())
        diff = float((other[name] - g).float().norm()) if name in other else float("inf")
        rows.append((name, diff / max(norm, 1e-30), norm))
    return sorted(rows, key=lambda row: -row[1])[:top]


def train_losses(student, forward_of, data, autocast: bool, lr: float) -> list[float]:
    """Noise losses of QAT steps on ``data``; ``forward_of(model)`` gives the forward."""
    import torch

    from binarydm.train.step import StepParts, qat_step

    parts = StepParts(
        student,
        torch.optim.AdamW(student.parameters(), lr=lr),
        autocast_dtype=torch.bfloat16 if autocast else None,
        grad_clip=1.0,
    )
    parts.forward_model = forward_of(student)
    return [qat_step(parts, *batch, step=i + 1).loss_noise for i, batch in enumerate(data)]


def variant(
    base,
    data,
    *,
    backend: str,
    autocast: bool,
    cache_flag: bool,
    lr: float,
    top: int = 0,
    composed: bool = True,
) -> dict:
    import torch

    from binarydm.quant import use_composed_quantizers_

    torch._dynamo.reset()
    torch._functorch.config.autograd_cache_allow_custom_autograd_functions = cache_flag

    def compiled(model):
        if backend == "none":
            return model
        if composed:  # as the training loop does before compiling
            use_composed_quantizers_(model)
        return torch.compile(model, backend=backend)

    started = time.perf_counter()
    model = copy.deepcopy(base)
    eager_loss, eager_grads = _grads(model, model, data[0], autocast)
    loss, grads = _grads(model, compiled(model), data[0], autocast)
    _, fp32_grads = _grads(model, model, data[0], False)
    first_s = time.perf_counter() - started
    rel = {
        "grad_rel": _grad_rel(eager_grads, grads),
        # Against the fp32 eager gradient: which of the two bf16 gradients is nearer it.
        "grad_rel_fp32_eager": _grad_rel(fp32_grads, eager_grads),
        "grad_rel_fp32_compiled": _grad_rel(fp32_grads, grads),
    }
    rel["worst_params"] = _worst(eager_grads, grads, top)
    del model, eager_grads, grads, fp32_grads
    model = copy.deepcopy(base)
    losses = train_losses(model, compiled, data, autocast, lr)
    del model
    torch._dynamo.reset()
    if torch.cuda.is_available():  # each variant's copy and graphs go before the next's
        torch.cuda.empty_cache()
    return {
        "backend": backend,
        "autocast": "bf16" if autocast else "none",
        "cache_flag": cache_flag,
        "loss_eager": eager_loss,
        "loss_diff": loss - eager_loss,
        **rel,
        "first_step_s": round(first_s, 1),
        "losses": losses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--teacher", help="an FP UNet directory (default: the micro UNet)")
    parser.add_argument("--recipe", default="baseline", choices=("baseline", "v1", "v5"))
    parser.add_argument("--activation-bits", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument(
        "--variants",
        default="none:bf16:1,none:bf16:1,eager:bf16:1,aot_eager:bf16:1,inductor:bf16:1,"
        "inductor:bf16:0,inductor:none:1,none:none:1",
        help="backend:autocast(bf16|none):cache_flag(0|1), comma separated; backend none: "
        "no torch.compile (the reference)",
    )
    parser.add_argument(
        "--worst",
        type=int,
        default=0,
        help="list the N parameters whose gradients differ most (relatively)",
    )
    parser.add_argument(
        "--functions",
        action="store_true",
        help="compile LSQ's autograd functions as they are (before 2026-12-03; the sign STE "
        "is plain ops since)",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch

    student, shape = build_student(args)
    data = batches(shape, args.steps + 1, args.device)
    # The loop's first step runs eagerly and initialises the quantizers (LSQ steps, ...).
    autocast_first = args.device.startswith("cuda")
    _loss(student, *data[0], autocast_first).backward()
    student.zero_grad(set_to_none=True)
    report = {"args": vars(args) | {"json": None}, "torch": torch.__version__, "variants": []}
    if args.device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name()
    reference: dict[str, list[float]] = {}
    for spec in args.variants.split(","):
        backend, autocast, flag = spec.split(":")
        row = variant(
            student,
            data[1:],
            backend=backend,
            autocast=autocast == "bf16",
            cache_flag=flag == "1",
            lr=args.lr,
            top=args.worst,
            composed=not args.functions,
        )
        tail = sum(row["losses"][-10:]) / len(row["losses"][-10:])
        ref = reference.setdefault(row["autocast"], row["losses"])
        ref_tail = sum(ref[-10:]) / len(ref[-10:])
        row["tail_loss"] = tail
        row["tail_vs_reference"] = tail / ref_tail - 1
        report["variants"].append(row)
        print(
            f"{spec:20s} loss_diff {row['loss_diff']:+.2e} grad_rel "
            + " ".join(f"{k}={v:.2e}" for k, v in row["grad_rel"].items() if k != "missing")
            + f" | vs fp32: eager {row['grad_rel_fp32_eager']['all']:.2e}"
            f" compiled {row['grad_rel_fp32_compiled']['all']:.2e}"
            + f" | last-10 loss {tail:.5f} ({row['tail_vs_reference']:+.2%} vs no compile)"
            f" first step {row['first_step_s']} s",
            flush=True,
        )
        for name, rel_diff, norm in row["worst_params"]:
            print(f"    {rel_diff:9.2e} |g| {norm:9.2e} {name}", flush=True)
        if args.json:  # after every variant: a run cut off keeps what it measured
            args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
