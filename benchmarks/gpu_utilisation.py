"""Sample the GPUs' utilisation and memory beside a running study, into a JSON file.

    python benchmarks/gpu_utilisation.py --json util.json --while-pid PID [--period-s 2]

Reads ``nvidia-smi`` every ``--period-s`` seconds (``study_overhead.GpuSampler``) for as
long as process ``PID`` lives (a study's driver, as `cifar10_w1_session.sh start` records
it) or for ``--duration-s``, and rewrites the JSON every ``--save-every-s`` seconds, so a
machine lost mid-study still leaves the samples so far. ``summarise`` reads such a file
against a study's run archive and reports the mean utilisation over the study's window
and by how many of its trials were training or evaluating at the time:

    python benchmarks/gpu_utilisation.py summarise util.json benchmarks/results/runs/NAME
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_overhead import GpuSampler  # noqa: E402
from trials_per_gpu_hour import _role, load_archive  # noqa: E402


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, ended but not reaped, does not)."""
    status = Path(f"/proc/{pid}/status")
    try:
        return "\nState:\tZ" not in status.read_text()
    except OSError:
        return False


def record(args) -> None:
    sampler = GpuSampler(period_s=args.period_s)
    sampler.start()
    start = time.time()
    out = Path(args.json)

    def save() -> None:
        rows = [
            {"unix": when, "gpu": index, "util_pct": util, "memory_mib": mem}
            for when, index, util, mem in list(sampler.samples)
        ]
        # Whole or not at all: a machine lost mid-write keeps the previous file.
        partial = out.with_name(out.name + ".partial")
        partial.write_text(json.dumps({"period_s": args.period_s, "samples": rows}) + "\n")
        os.replace(partial, out)

    last_save = start
    while True:
        time.sleep(1.0)
        now = time.time()
        if args.while_pid and not _alive(args.while_pid):
            break
        if args.duration_s and now - start >= args.duration_s:
            break
        if now - last_save >= args.save_every_s:
            save()
            last_save = now
    sampler.stop()
    save()


def _phases(archive: Path) -> list[dict]:
    """Each finished trial's training and evaluation intervals (unix s) from its archive.

    Placed back from the run's end time: what follows the evaluation (the checkpoint and
    the run's last logging, about 3 s) shifts them later by that much.
    """
    phases = []
    data = load_archive(archive)
    for run in data["runs"]:
        if _role(run, data["experiment"]["name"]) != "trial" or run["status"] != "FINISHED":
            continue  # the FP reference run has no slot of its own
        metrics = run["metrics"]
        end = run["end_time"]
        train_s, eval_s = metrics.get("train_s"), metrics.get("eval_s")
        if end is None or train_s is None or eval_s is None:
            continue
        end_s = end / 1000.0
        phases.append(
            {
                "name": run["run_name"],
                "eval": (end_s - eval_s, end_s),
                "train": (end_s - eval_s - train_s, end_s - eval_s),
            }
        )
    return phases


def summarise(samples_file: Path, archive: Path, gpu: int = 0) -> dict:
    """Utilisation of GPU ``gpu`` over the recording's trials: overall and by how many
    trials were training or evaluating."""
    data = json.loads(Path(samples_file).read_text())
    samples = [s for s in data["samples"] if s["gpu"] == gpu]
    if len(samples) < 2:
        raise SystemExit(
            f"{samples_file}: {len(samples)} sample(s) of GPU {gpu}, nothing to summarise"
        )
    first, last = samples[0]["unix"], samples[-1]["unix"]
    # nvidia-smi's own run time adds to the period: the samples' real spacing.
    spacing = (last - first) / (len(samples) - 1)
    # The trials of the recording's time (an archive of a resumed study holds earlier ones).
    phases = [p for p in _phases(archive) if p["eval"][1] >= first and p["train"][0] <= last]
    result = {"gpu": gpu, "samples": len(samples), "recorded_s": last - first, "spacing_s": spacing,
              "trials": sorted(p["name"] for p in phases)}  # fmt: skip
    if phases:
        lo = min(p["train"][0] for p in phases)
        hi = max(p["eval"][1] for p in phases)
        samples = [s for s in samples if lo <= s["unix"] <= hi]
        result["window_s"] = hi - lo
    result["window_samples"] = len(samples)
    if not samples:
        return result
    utils = [s["util_pct"] for s in samples]
    result["mean_pct"] = statistics.fmean(utils)
    result["median_pct"] = statistics.median(utils)
    result["max_memory_gib"] = max(s["memory_mib"] for s in samples) / 1024
    groups: dict[tuple[int, int], list[float]] = {}
    for s in samples:
        t = s["unix"]
        training = sum(p["train"][0] <= t < p["train"][1] for p in phases)
        evaluating = sum(p["eval"][0] <= t < p["eval"][1] for p in phases)
        groups.setdefault((training, evaluating), []).append(s["util_pct"])
    result["by_phase"] = [
        {
            "training": training,
            "evaluating": evaluating,
            "seconds": len(values) * spacing,
            "mean_pct": statistics.fmean(values),
        }
        for (training, evaluating), values in sorted(groups.items(), reverse=True)
    ]
    return result


def markdown(result: dict) -> str:
    lines = [
        f"GPU {result['gpu']}: {result['samples']} samples over {result['recorded_s']:.0f} s "
        f"(every {result['spacing_s']:.2f} s); {len(result['trials'])} trials ran in that time."
    ]
    if "window_s" in result:
        lines.append(
            f"From the first trial's training to the last one's evaluation, "
            f"{result['window_s']:.0f} s ({result['window_samples']} samples):"
        )
    if "mean_pct" not in result:
        return "\n".join(lines) + "\n"
    lines += [
        f"utilisation mean {result['mean_pct']:.1f} %, median {result['median_pct']:.0f} %; "
        f"memory used at most {result['max_memory_gib']:.1f} GiB.",
        "",
        "| trials training | trials evaluating | seconds | mean utilisation % |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for row in result["by_phase"]:
        lines.append(
            f"| {row['training']} | {row['evaluating']} | {row['seconds']:.0f} | "
            f"{row['mean_pct']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    rec = sub.add_parser("record", help="sample (the default command)")
    for p in (parser, rec):
        p.add_argument("--json", default="gpu_utilisation.json")
        p.add_argument("--period-s", type=float, default=2.0)
        p.add_argument("--save-every-s", type=float, default=30.0)
        p.add_argument("--while-pid", type=int, default=0)
        p.add_argument("--duration-s", type=float, default=0.0)
    summ = sub.add_parser("summarise", help="the utilisation over a study's trials")
    summ.add_argument("json")
    summ.add_argument("archive", help="the study's run archive (bdm-search export)")
    summ.add_argument("--gpu", type=int, default=0, help="the GPU index to summarise")
    args = parser.parse_args()
    if args.command == "summarise":
        print(markdown(summarise(Path(args.json), Path(args.archive), args.gpu)), end="")
        return
    if not (args.while_pid or args.duration_s):
        parser.error("give --while-pid or --duration-s: the sampler needs an end")
    os.makedirs(Path(args.json).resolve().parent, exist_ok=True)
    record(args)


if __name__ == "__main__":
    main()
