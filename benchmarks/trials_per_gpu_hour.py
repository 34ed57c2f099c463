"""Trials per GPU-hour of GPU studies, and where each trial's wall time went, from run archives.

    python benchmarks/trials_per_gpu_hour.py benchmarks/results/runs/cifar10_w1a4_cl_s0 \\
        benchmarks/results/runs/cifar10_w1a4_cl_s1 --gpus 1 --markdown out.md --json out.json

Reads `bdm-search export` archives (docs/run-archive.md), so a committed study can be
re-measured anywhere; export a live store first. Archives given together are taken to
have run at the same time on ``--gpus`` GPUs (one session's concurrent studies on one
card, each with its own Ray): the study window runs from the first study's parent run
start (the driver handing trials to Ray Tune, after Ray's start-up) to the last trial's
end, and trials per GPU-hour is ``finished trials / (window hours x gpus)``. The FP
reference run, where a study has one, counts in the window but not as a trial.

A study resumed over several device sessions (`--resume`, its archive imported again)
is measured session by session: its finished trials' last attempts fall into busy
periods (a pause of over ``SESSION_GAP_S`` with no trial running opens the next), the
window is the sum of those periods (each from the study's start or a driver's hand-off
to Ray Tune where one lies in the pause before it, else from its first trial's start),
and the hours between sessions do not count. A trial continued in a
later session is timed from that attempt's start (``timing/trial_entered_unix``), not
from its run's first start. What a session spent on attempts that were cut off at its
end (their trials finished in a later session) is not in any window: the rate counts the
time of the attempts that finished.

Each finished trial's wall time (its MLflow run, start to end, plus the actor's start
before it) is split into: ``actor_start`` (Tune's launch, or the actor's creation if
later, to the trainable's first line: process start and imports), ``run_start`` (the
trainable to its MLflow run), ``prepare``, ``setup`` (device, data, models, LRM),
``train`` (the loop with its checkpoints and rungs; ``checkpoint`` is shown inside it),
``sample``, ``fid`` (Inception features, FID, precision/recall), ``eval_other``
(held-out loss, OPs, packing, grid) and ``other`` (what the run's time holds beyond them:
Ray around the loop, tracking at the end). Rates: each trial's own
``train_images_per_s`` and ``sample_images_per_s``; their sums are the card's aggregate
only while every trial runs together (one wave), which is checked and said.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

#: The table's columns: the split's parts in a trial's order, eval with its own parts after
#: it, and the checkpoints inside train.
COLUMNS = (
    "actor_start",
    "run_start",
    "prepare",
    "setup",
    "train",
    "eval",
    "sample",
    "fid",
    "eval_other",
    "other",
    "checkpoint",
)
#: The split's parts, in a trial's order (they add up to its wall time).
PARTS = (
    "actor_start",
    "run_start",
    "prepare",
    "setup",
    "train",
    "sample",
    "fid",
    "eval_other",
    "other",
)


def load_archive(folder: Path) -> dict:
    path = Path(folder) / "runs.json"
    if not path.is_file():
        raise SystemExit(f"{folder}: no runs.json (not a `bdm-search export` archive)")
    return json.loads(path.read_text())


def _role(run: dict, study: str) -> str:
    name = run["run_name"]
    if name == study or run["tags"].get("bdm.role") == "study":
        return "study"
    if name.startswith("trial-"):
        return "trial"
    return "other"


def trial_split(run: dict, launched_unix: float) -> dict[str, float | None]:
    """Seconds of each part of one finished trial (``PARTS``), and its wall time.

    A part whose timing metric the run lacks (archives older than the metric) is None;
    ``other`` then holds it too."""
    m = run["metrics"]
    created = m.get("timing/actor_created_unix")
    entered = m.get("timing/trial_entered_unix")
    begun = run["start_time"] / 1000
    if entered:  # the last attempt's run time: its run is reused from an earlier session's
        begun = max(begun, entered + (m.get("timing/run_start_s") or 0.0))
    elif run["tags"].get("attempt", "1") != "1":
        raise SystemExit(
            f"{run['run_name']}: attempt {run['tags']['attempt']} without "
            "timing/trial_entered_unix, so its last attempt's start is unknown (its run "
            "started with the first): an archive older than that metric cannot be timed"
        )
    wall = run["end_time"] / 1000 - begun
    # The driver's hand-off counts only for the attempts it launched (the parent run keeps
    # the latest session's): an earlier session's actor started before it.
    if created and entered:
        actor_start = entered - (
            max(created, launched_unix) if launched_unix <= entered else created
        )
    else:
        actor_start = None
    sample, fid, eval_s = m.get("timing/sample_s"), m.get("timing/fid_s"), m["eval_s"]
    split = {
        "actor_start": actor_start,
        # run_start is timed before the run exists: it precedes the run's own wall time.
        "run_start": m.get("timing/run_start_s"),
        "prepare": m.get("timing/prepare_s"),
        "setup": m.get("timing/setup_s"),
        "train": m["train_s"],
        "sample": sample,
        "fid": fid,
        "eval_other": None if sample is None or fid is None else eval_s - sample - fid,
    }
    inside_run = (split["prepare"] or 0.0) + (split["setup"] or 0.0) + split["train"] + eval_s
    split["other"] = wall - inside_run
    split["wall"] = (actor_start or 0.0) + (split["run_start"] or 0.0) + wall
    split["checkpoint"] = m.get("timing/checkpoint_s")
    split["eval"] = eval_s
    split["attempt_start_unix"] = begun - (split["run_start"] or 0.0) - (actor_start or 0.0)
    return split


#: A pause between trials longer than this separates two device sessions: within one,
#: a slot's next trial starts seconds after the last one ended (sessions of this project
#: are hours or days apart).
SESSION_GAP_S = 600.0


def _sessions(trials: list[dict], study_start: float, handoffs: list[float]) -> list[dict]:
    """The busy periods the trials ran in, each with its window: one per device session.

    A period starts at the study's start or a driver's hand-off to Ray Tune when one lies
    in the pause before its first trial, else at that trial's start."""
    periods: list[list[dict]] = []
    for trial in sorted(trials, key=lambda t: t["start_unix"]):
        if periods and trial["start_unix"] - max(t["end_unix"] for t in periods[-1]) < (
            SESSION_GAP_S
        ):
            periods[-1].append(trial)
        else:
            periods.append([trial])
    sessions, previous_end = [], float("-inf")
    for period in periods:
        first = min(t["start_unix"] for t in period)
        end = max(t["end_unix"] for t in period)
        starts = [h for h in (study_start, *handoffs) if previous_end < h <= first]
        start = min(starts, default=first)
        sessions.append(
            {
                "start_unix": start,
                "end_unix": end,
                "window_s": round(end - start, 1),
                "trials": [t["trial"] for t in period],
                "one_wave": max(t["start_unix"] for t in period)
                < min(t["end_unix"] for t in period),
            }
        )
        previous_end = end
    return sessions


def summarise(archives: list[dict], gpus: float) -> dict:
    studies, trials, handoffs = [], [], []
    for archive in archives:
        name = archive["experiment"]["name"]
        runs = archive["runs"]
        parents = [r for r in runs if _role(r, name) == "study"]
        if not parents:
            raise SystemExit(f"archive of {name!r} has no study run")
        parent = parents[0]
        launched = float(parent["tags"].get("timing/tune_started_unix", parent["start_time"] / 1e3))
        handoffs.append(launched)
        finished = [r for r in runs if _role(r, name) == "trial" and r["status"] == "FINISHED"]
        unfinished = [r for r in runs if _role(r, name) == "trial" and r["status"] != "FINISHED"]
        studies.append(
            {
                "study": name,
                "start_unix": parent["start_time"] / 1000,
                "trials_finished": len(finished),
                "trials_not_finished": len(unfinished),
            }
        )
        for run in finished:
            p, m = run["params"], run["metrics"]
            split = trial_split(run, launched)
            attempt_start = split.pop("attempt_start_unix")
            trials.append(
                {
                    "study": name,
                    "trial": run["run_name"],
                    "run_id": run["run_id"][:8],
                    "row": p.get("row"),
                    "start_unix": attempt_start,
                    "end_unix": run["end_time"] / 1000,
                    "steps": int(p["training.steps"]),
                    "batch": int(p["training.batch_size"]),
                    # Logged under the FID's own names (beside fid_dims, fid_reference).
                    "fid_samples": int(p["fid_samples"]),
                    "sampling_steps": int(p["sampling_steps"]),
                    "fid_dims": int(p["fid_dims"]),
                    "gpus_per_trial": float(p.get("workers.gpus_per_worker", 0))
                    * int(p.get("workers.num_workers", 1)),
                    "train_images_per_s": m.get("train_images_per_s"),
                    "sample_images_per_s": m.get("sample_images_per_s"),
                    "split_s": {k: None if v is None else round(v, 2) for k, v in split.items()},
                }
            )
    if not trials:
        raise SystemExit("no finished trial in these archives: nothing to measure")
    sessions = _sessions(trials, min(s["start_unix"] for s in studies), handoffs)
    window = sum(s["window_s"] for s in sessions)
    # Rates add up to the card's only for one wave of one session.
    one_wave = len(sessions) == 1 and sessions[0]["one_wave"]

    def mean(key: str) -> float | None:
        values = [t["split_s"][key] for t in trials if t["split_s"][key] is not None]
        return statistics.fmean(values) if values else None

    def share(key: str) -> float | None:
        known = [t["split_s"] for t in trials if t["split_s"][key] is not None]
        if not known:
            return None
        return round(sum(s[key] for s in known) / sum(s["wall"] for s in known), 3)

    def rate_sum(key: str) -> float | None:
        values = [t[key] for t in trials if t[key] is not None]
        return sum(values) if one_wave and values else None

    return {
        "archives": [s["study"] for s in studies],
        "gpus": gpus,
        "studies": studies,
        "trials_finished": len(trials),
        "window_s": round(window, 1),
        "sessions": sessions,
        "trials_per_gpu_hour": round(len(trials) / (window / 3600 * gpus), 2),
        "one_wave": one_wave,
        "mean_split_s": {
            k: None if mean(k) is None else round(mean(k), 1) for k in (*COLUMNS, "wall")
        },
        "share_of_wall": {k: share(k) for k in COLUMNS},
        "train_images_per_s_sum": rate_sum("train_images_per_s"),
        "sample_images_per_s_sum": rate_sum("sample_images_per_s"),
        "budget": sorted(
            {
                (t["steps"], t["batch"], t["fid_samples"], t["sampling_steps"], t["fid_dims"])
                for t in trials
            }
        ),
        "trials": trials,
    }


def _window_words(summary: dict) -> str:
    sessions = summary["sessions"]
    if len(sessions) == 1:
        return "first study start to last trial end"
    each = ", ".join(
        f"{len(s['trials'])} in {s['window_s']:.0f} s"
        f" ({len(s['trials']) / (s['window_s'] / 3600 * summary['gpus']):.1f}/GPU-hour)"
        for s in sessions
    )
    return f"the sum of {len(sessions)} sessions' windows: {each}"


def markdown(summary: dict) -> str:
    budgets = "; ".join(
        f"{s} QAT steps at batch {b}, FID-{dims} of {n} DDIM-{d} samples"
        for s, b, n, d, dims in summary["budget"]
    )
    lines = [
        f"Studies {', '.join(summary['archives'])} on {summary['gpus']:g} GPU(s): "
        f"{summary['trials_finished']} finished trials in {summary['window_s']:.0f} s "
        f"({_window_words(summary)}) = **{summary['trials_per_gpu_hour']:.1f} "
        f"trials per GPU-hour** ({budgets}).",
        "",
        "| trial | row | wall s | " + " | ".join(COLUMNS) + " | train img/s | sample img/s |",
        "| --- | --- | ---: | " + " | ".join("---:" for _ in COLUMNS) + " | ---: | ---: |",
    ]
    for t in summary["trials"]:
        s = t["split_s"]
        cells = ["-" if s[k] is None else f"{s[k]:.1f}" for k in COLUMNS]
        rates = [
            "-" if t[k] is None else f"{t[k]:.0f}"
            for k in ("train_images_per_s", "sample_images_per_s")
        ]
        lines.append(
            f"| {t['study']} {t['trial']} {t['run_id']} | {t['row'] or '-'} | {s['wall']:.1f} | "
            + " | ".join(cells + rates)
            + " |"
        )
    share = summary["share_of_wall"]
    lines += [
        "",
        "Mean share of a trial's wall time: "
        + ", ".join(f"{k} {100 * share[k]:.1f} %" for k in COLUMNS if share[k] is not None)
        + ".",
    ]
    if summary["one_wave"]:
        lines.append(
            f"All trials ran together (one wave): the card trained "
            f"{summary['train_images_per_s_sum']:.0f} images/s and sampled "
            f"{summary['sample_images_per_s_sum']:.1f} images/s in all (sums of the trials' "
            "rates)."
        )
    else:
        lines.append("The trials ran in several waves: their rates do not add up to the card's.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archives", nargs="+", type=Path, help="`bdm-search export` folders")
    parser.add_argument("--gpus", type=float, default=1.0, help="GPUs the studies shared")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.gpus <= 0:
        parser.error("--gpus must be positive")
    summary = summarise([load_archive(a) for a in args.archives], args.gpus)
    text = markdown(summary)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
