"""Time a whole study run through ``bdm-search``: wall time outside trial compute, GPU use.

    python benchmarks/study_overhead.py benchmarks/studies/gpu_overhead.yaml \
        --workdir /tmp/bdm-study --json overhead.json

Runs ``bdm-search run FILE`` (the real CLI: local Ray, SQLite MLflow and Optuna in
``--workdir``) while a thread samples ``nvidia-smi`` once a second, then reads every
trial back from MLflow. Trial compute is what the workers spend in the training loop
and in evaluation (the trial's own ``train_s`` + ``eval_s``). With S concurrent trial
slots, the fraction of wall time outside trial compute over the trial window (first
trial start to last trial end) is ``1 - sum(compute) / (S x window)``; it holds Ray
Train worker start-up, model and data loading, checkpoints, MLflow/Optuna bookkeeping
and slots left idle. The window from launch starts earlier, when the driver hands the
trials to Ray Tune (``tune_started_unix`` on the study's parent run), so it also holds
Tune's launch of the first trial actors, their process start and imports and their
MLflow run creation, which a trial's own run (created by the trial) cannot see. The
whole-study figure adds Ray start-up and the FP teacher.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path


class GpuSampler(threading.Thread):
    """(unix time, gpu index, utilisation %, memory MiB) from nvidia-smi, once a second."""

    def __init__(self, period_s: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.period_s = period_s
        self.samples: list[tuple[float, int, float, float]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        query = ["nvidia-smi", "--query-gpu=index,utilization.gpu,memory.used"]
        while not self._halt.is_set():
            now = time.time()
            out = subprocess.run(
                [*query, "--format=csv,noheader,nounits"], capture_output=True, text=True
            ).stdout
            for line in out.strip().splitlines():
                index, util, mem = (float(v) for v in line.split(","))
                self.samples.append((now, int(index), util, mem))
            self._halt.wait(self.period_s)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def mean_utilisation(self, start: float, end: float) -> dict[int, float]:
        per_gpu: dict[int, list[float]] = {}
        for when, index, util, _ in self.samples:
            if start <= when <= end:
                per_gpu.setdefault(index, []).append(util)
        return {i: statistics.fmean(v) for i, v in sorted(per_gpu.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", help="study file (YAML)")
    parser.add_argument("--workdir", default="bdm-study-overhead")
    parser.add_argument("--set", action="append", default=[], help="passed to bdm-search")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from binarydm.spec import load_study
    from binarydm.tracking import load_study_results, load_study_summary

    spec = load_study(args.file, overrides=args.set)
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    study_file = Path(args.file).resolve()
    gpus = shutil.which("nvidia-smi") is not None
    sampler = GpuSampler() if gpus else None
    if sampler:
        sampler.start()
    command = [sys.executable, "-m", "binarydm.cli", "run", str(study_file)]
    for kv in args.set:
        command += ["--set", kv]
    start = time.time()
    code = subprocess.run(command, cwd=work, env=os.environ.copy()).returncode
    end = time.time()
    if sampler:
        sampler.stop()
    if code != 0:
        # Still summarise: trials that finished are in MLflow whatever failed after them.
        print(f"bdm-search exited with {code}; summarising what MLflow holds", flush=True)

    uri = f"sqlite:///{work}/mlflow.db"
    try:
        trials = load_study_results(spec.name, spec.name, tracking_uri=uri)
        parent_tags = load_study_summary(spec.name, spec.name, tracking_uri=uri)["tags"]
    except LookupError:
        trials = []  # the study stopped before its first run (bad input, no data)
    if not trials:
        sys.exit(f"no trial ran (bdm-search exited with {code}): nothing to time")
    done = [t for t in trials if t["status"] == "FINISHED"]
    workers = spec.settings.workers
    slots = spec.resources.max_concurrent_trials or len(done)
    window_start = min(t["start_time"] for t in trials) / 1000
    window_end = max(t["end_time"] for t in trials) / 1000
    window = window_end - window_start
    compute = [t["metrics"]["train_s"] + t["metrics"]["eval_s"] for t in done]
    per_trial = [
        (t["end_time"] - t["start_time"]) / 1000 - c for t, c in zip(done, compute, strict=True)
    ]

    def total(key: str) -> float:
        return sum(t["metrics"].get(key, 0.0) for t in done)

    # From the driver's hand-over to Ray Tune (a resumed study: its last launch).
    launched = float(parent_tags.get("timing/tune_started_unix", window_start))
    created = [
        t["metrics"]["timing/actor_created_unix"]
        for t in trials
        if "timing/actor_created_unix" in t["metrics"]
    ]
    launch_window = window_end - launched

    summary = {
        "study": spec.name,
        "bdm_search_exit_code": code,
        "trials_finished": len(done),
        "trials": len(trials),
        "slots": slots,
        "gpus_per_trial": workers.gpus_per_worker * workers.num_workers if workers.use_gpu else 0,
        "study_wall_s": end - start,
        "before_first_trial_s": window_start - start,
        "after_last_trial_s": end - window_end,
        "trial_window_s": window,
        "trial_compute_s": sum(compute),
        "train_s": sum(t["metrics"]["train_s"] for t in done),
        "eval_s": sum(t["metrics"]["eval_s"] for t in done),
        # Inside the trial's run but outside compute: worker set-up before the first step.
        "setup_s": total("timing/setup_s"),
        # ... of which: the CUDA context, the training set to its device, the models built
        # (diffusers' UNet imported on first use, the teacher loaded and moved, copied and
        # binarised on the device) and the LRM.
        "setup_device_s": total("timing/setup_device_s"),
        "setup_data_s": total("timing/setup_data_s"),
        "setup_build_s": total("timing/setup_build_s"),
        "setup_lrm_s": total("timing/setup_lrm_s"),
        # Checkpoints saved (serialised, hashed, persisted), part of ray_train_s below.
        "checkpoint_s": total("timing/checkpoint_s"),
        "sample_s": total("timing/sample_s"),
        "fid_s": total("timing/fid_s"),
        # Where a trial's time outside compute goes: before its fit (params, data hash),
        # Ray Train around the workers (fit_s minus the workers' set-up + compute), after.
        "prepare_s": total("timing/prepare_s"),
        "ray_train_s": total("timing/fit_s") - total("timing/setup_s") - sum(compute),
        "ray_start_s": total("timing/ray_start_s"),  # fit() to the worker's first line
        "ray_stop_s": total("timing/ray_stop_s"),  # the worker's final report to fit()'s return
        "after_fit_s": sum((t["end_time"] - t["start_time"]) / 1000 for t in done)
        - total("timing/prepare_s")
        - total("timing/fit_s"),
        "overhead_in_window": 1 - sum(compute) / (slots * window),
        # The stricter figure: from launch, so the first actors' start counts too.
        "launch_window_s": launch_window,
        "overhead_from_launch": 1 - sum(compute) / (slots * launch_window),
        "launch_to_first_actor_s": (min(created) - launched) if created else None,
        "launch_to_first_trial_s": window_start - launched,
        # Actor process start (or launch, for a process Ray had started idle) -> trainable.
        "actor_start_s": sum(
            t["metrics"]["timing/trial_entered_unix"]
            - max(t["metrics"]["timing/actor_created_unix"], launched)
            for t in done
            if "timing/actor_created_unix" in t["metrics"]
        ),
        "run_start_s": total("timing/run_start_s"),  # trainable -> its MLflow run started
        "overhead_whole_study": 1 - sum(compute) / (slots * (end - start)),
        "per_trial_outside_compute_s": statistics.fmean(per_trial) if per_trial else None,
        "per_trial_wall_s": [round((t["end_time"] - t["start_time"]) / 1000, 1) for t in done],
        "per_trial_compute_s": [round(c, 1) for c in compute],
    }
    if sampler:
        summary["gpu_util_in_window"] = sampler.mean_utilisation(window_start, window_end)
        summary["gpu_util_whole_study"] = sampler.mean_utilisation(start, end)
        summary["gpu_samples"] = len(sampler.samples)
        summary["gpu_peak_memory_mib"] = max((s[3] for s in sampler.samples), default=0.0)
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
