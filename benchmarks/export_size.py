"""On-disk size of the packed 1-bit checkpoint vs FP32 safetensors, beside the efficiency report.

For the ``small`` preset (32x32) and the paper's LDM-4 UNet (``ldm4-bedroom``,
64x64x3 latents), at W1A4 (one basis everywhere) and at the default BinaryDM
recipe (two bases in the outer 2 levels, A4), it writes into a temporary folder

- the FP32 model with ``safetensors.torch.save_file(model.state_dict())``,
- the binarized model with ``binarydm.export.save_packed``,

reloads the packed file, checks the reloaded outputs against the fake-quant
model, and prints (or writes) a markdown report with the file sizes and the
``efficiency_report`` totals. Nothing is written into the repository except the
report itself.

    python benchmarks/export_size.py --output benchmarks/results/export_size.md
    python benchmarks/export_size.py --presets small   # a few seconds
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from binarydm import BinaryDMConfig, binarize_
from binarydm.export import load_packed, save_packed
from binarydm.metrics.efficiency import efficiency_report
from binarydm.models import build_unet

MIB = 2**20
RECIPES = {
    "W1A4 (1 basis)": BinaryDMConfig().replace(**{"weight.bases": 1}),
    "2 bases in outer 2 levels, A4": BinaryDMConfig().replace(
        **{"weight.bases": 2, "weight.scope_levels": 2}
    ),
}


def example_inputs(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    config = model.config
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(
        1, config.in_channels, config.sample_size, config.sample_size, generator=generator
    )
    return sample, torch.tensor([500])


def measure(preset: str, folder: Path) -> list[dict]:
    """One row per recipe: file sizes, timings, report totals and the reload check."""
    fp = build_unet(preset)
    inputs = example_inputs(fp)
    fp_path = folder / f"{preset}-fp32.safetensors"
    save_file(fp.state_dict(), str(fp_path))
    fp_report = efficiency_report(fp, inputs)
    rows = [_row(preset, "FP32", fp_path, fp_path.stat().st_size, fp_report)]
    for recipe, config in RECIPES.items():
        model = binarize_(copy.deepcopy(fp), config).eval()
        with torch.no_grad():
            expected = model(*inputs).sample  # also the quantizers' one-time init
        start = time.perf_counter()
        path = save_packed(model, folder / f"{preset}-packed.safetensors")
        save_s = time.perf_counter() - start
        start = time.perf_counter()
        loaded = load_packed(path).eval()
        load_s = time.perf_counter() - start
        with torch.no_grad():
            max_diff = (loaded(*inputs).sample - expected).abs().max().item()
        report = efficiency_report(model, inputs)
        row = _row(preset, recipe, path, fp_path.stat().st_size, report)
        row.update(save_s=save_s, load_s=load_s, max_diff=max_diff)
        rows.append(row)
        del model, loaded
    return rows


def _header_bytes(path: Path) -> int:
    # safetensors starts with the little-endian u64 length of its JSON header.
    with path.open("rb") as file:
        return int.from_bytes(file.read(8), "little") + 8


def _row(preset: str, recipe: str, path: Path, fp32_bytes: int, report) -> dict:
    file_bytes = path.stat().st_size
    return {
        "preset": preset,
        "recipe": recipe,
        "file_mib": file_bytes / MIB,
        "header_kib": _header_bytes(path) / 1024,
        "file_saving": fp32_bytes / file_bytes,
        **report.to_dict(),
    }


def markdown(rows: list[dict], command: str, seconds: float, load: float) -> str:
    header = (
        "| model | recipe | file MiB | header KiB | file saving | report size_mib | size_saving "
        "| ops_g | bops_g | flops_g | ops_saving | save s | load s | reload max diff |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        timing = (
            f"{r['save_s']:.1f} | {r['load_s']:.1f} | {r['max_diff']:.1e}"
            if "save_s" in r
            else "- | - | -"
        )
        lines.append(
            f"| {r['preset']} | {r['recipe']} | {r['file_mib']:.2f} | {r['header_kib']:.0f} "
            f"| {r['file_saving']:.2f}x "
            f"| {r['size_mib']:.2f} | {r['size_saving']:.2f}x | {r['ops_g']:.3f} "
            f"| {r['bops_g']:.3f} | {r['flops_g']:.3f} | {r['ops_saving']:.2f}x | {timing} |"
        )
    return (
        "# Packed export size\n\n"
        f"Command: `{command}`\n\n"
        f"Machine: {_machine()}; total {seconds:.0f} s; load average {load:.1f} at start "
        "(save/load seconds are indicative when other jobs share the cores).\n\n"
        "FP32 file = `safetensors.torch.save_file(model.state_dict())`; packed file = "
        "`binarydm.export.save_packed` (1 bit per sign, per-channel scales, FP32 rest). "
        "`size_mib`, `ops_g` and savings come from `efficiency_report` (per sample, "
        'batch 1); "reload max diff" is the max |output| difference between the '
        "fake-quant model and `load_packed` of its file. A packed file exceeds `size_mib` "
        "by its JSON header (tensor index, diffusers config, layer manifest) and the "
        "quantizers' int64/bool bookkeeping buffers.\n\n" + header + "\n".join(lines) + "\n"
    )


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]  # fmt: skip
        cpu = names[0] if names else cpu
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} CPU cores, {gpu}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["small", "ldm4-bedroom"])
    parser.add_argument("--output", type=Path, help="write the markdown report here")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        rows = [row for preset in args.presets for row in measure(preset, Path(folder))]
    command = "python " + " ".join(sys.argv)
    text = markdown(rows, command, time.perf_counter() - start, load)
    print(text)
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
