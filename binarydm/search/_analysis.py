"""After a study: the Pareto front over its objectives, from MLflow alone.

Used at the end of ``bdm-search FILE`` and by ``bdm-search pareto EXPERIMENT``:
reads the child runs, marks ``pareto=true/false``, logs the hypervolume, trial
counts, plots and the Pareto members' packed checkpoints. The study's FP reference
run (``binarydm.search._reference``) is read beside the trials, never among them: it
gives every finished trial its ``fid_ratio_to_fp`` and the table and plots their FP
point, and stays out of the front, the hypervolume and its reference point.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from binarydm.search._pareto import (
    default_reference_point,
    hypervolume,
    hypervolume_history,
    pareto_front,
)

FID_RATIO = "fid_ratio_to_fp"
FP_ROW = "FP"


def _objective_values(record: dict[str, Any], metrics: list[str]) -> list[float] | None:
    values = [record["metrics"].get(m) for m in metrics]
    if any(v is None or not math.isfinite(v) for v in values):
        return None
    return [float(v) for v in values]


def summarize(
    tracker,
    objectives: list[tuple[str, str]],
    *,
    reference_point: dict[str, float] | None = None,
    study_file_text: str = "",
    log_checkpoints: bool = True,
) -> dict[str, Any]:
    """Recompute and record the study's Pareto front; returns what was found.

    ``reference`` in the result is the study's FINISHED FP reference run
    (``tracking.load_reference``), or None.
    """
    from binarydm.tracking import (
        load_reference,
        load_study_results,
        log_hypervolume_history,
        log_summary_table,
        plot_points,
    )

    metrics = [m for m, _ in objectives]
    directions = [d for _, d in objectives]
    records = load_study_results(tracker.experiment, tracker.study, tracker.tracking_uri)
    reference = load_reference(tracker.experiment, tracker.study, tracker.tracking_uri)
    if reference is not None and reference["status"] != "FINISHED":
        reference = None
    log_fid_ratios(tracker, records, reference)
    counts: dict[str, int] = {}
    for record in records:
        # A pruned trial's run ends KILLED in MLflow (it did not finish); its state tag says
        # why, and the counts (the console's last line, the parent's trials_* metrics) say it.
        state = "PRUNED" if record["tags"].get("state") == "PRUNED" else record["status"]
        counts[state] = counts.get(state, 0) + 1
    complete = [
        (r, vals)
        for r in records
        if r["status"] == "FINISHED" and (vals := _objective_values(r, metrics)) is not None
    ]
    pareto_ids: set[int] = set()
    volume = float("nan")
    ref: dict[str, float] = dict(reference_point or {})
    if complete:
        points = np.array([vals for _, vals in complete], dtype=float)
        mask = pareto_front(points, directions)
        pareto_ids = {r["trial_id"] for (r, _), on in zip(complete, mask, strict=True) if on}
        if not ref:
            ref = dict(zip(metrics, default_reference_point(points, directions), strict=True))
        ref_vector = [ref[m] for m in metrics]
        volume = hypervolume(points[mask], ref_vector, directions)
    tracker.mark_pareto({r["trial_id"]: r["run_id"] for r in records}, pareto_ids)
    for record in records:
        record["pareto"] = record["trial_id"] in pareto_ids
    tracker.log_study_summary(objectives, ref, volume, counts, study_file_text)
    history = _history(records, complete, ref, objectives)
    if complete:
        fp = reference["metrics"] if reference is not None else None
        tracker.log_pareto_plots(plot_points(records), objectives, fp=fp)
        log_hypervolume_history(tracker, history)
    if records:
        searched = sorted({p for r in records for p in r["searched"]})
        log_summary_table(tracker, records, metrics, searched, reference)
    if log_checkpoints:
        for record in records:
            packed = Path(record["tags"].get("checkpoint", "")) / "model.bdm"
            if record["pareto"] and packed.is_file():
                tracker.log_artifact_file(record["run_id"], packed, "checkpoint")
    return {
        "records": records,
        "pareto_ids": sorted(pareto_ids),
        "hypervolume": volume,
        "hypervolume_history": history,
        "reference_point": ref,
        "counts": counts,
        "objectives": objectives,
        "reference": reference,
    }


def _history(records, complete, ref, objectives) -> dict[str, Any]:
    """The hypervolume of the trials finished by each trial's end, in wall-clock seconds
    since the study's first trial started (an interrupted study's pause included)."""
    starts = [r["start_time"] for r in records if r.get("start_time")]
    timed = [(r, vals) for r, vals in complete if r.get("end_time")]
    out: dict[str, Any] = {
        "objectives": [list(o) for o in objectives],
        "reference_point": dict(ref),
        "first_trial_start_unix": min(starts) / 1000 if starts else None,
        "points": [],
    }
    if not starts or not timed:
        return out
    metrics, directions = [m for m, _ in objectives], [d for _, d in objectives]
    elapsed = [(r["end_time"] - min(starts)) / 1000 for r, _ in timed]
    steps = hypervolume_history(
        [vals for _, vals in timed], elapsed, [ref[m] for m in metrics], directions
    )
    out["points"] = [
        {"elapsed_s": t, "hypervolume": v, "trials_finished": sum(e <= t for e in elapsed)}
        for t, v in steps
    ]
    return out


def log_fid_ratios(tracker, records: list[dict[str, Any]], reference: dict[str, Any] | None):
    """Log ``fid_ratio_to_fp`` (trial FID / FP FID) on every finished trial with a FID.

    Idempotent: a run already holding the same value is not written again, so
    re-summarising (``bdm-search pareto``, a resume) adds no points to its history.
    """
    fp_fid = (reference or {}).get("metrics", {}).get("fid")
    if fp_fid is None or not math.isfinite(fp_fid) or fp_fid <= 0:
        return
    for record in records:
        fid = record["metrics"].get("fid")
        if record["status"] != "FINISHED" or fid is None or not math.isfinite(fid):
            continue
        ratio = fid / fp_fid
        logged = record["metrics"].get(FID_RATIO)
        if logged is None or not math.isclose(logged, ratio, rel_tol=1e-12, abs_tol=0.0):
            tracker.log_metrics(record["run_id"], {FID_RATIO: ratio})
            record["metrics"][FID_RATIO] = ratio


def pareto_table(summary: dict[str, Any]):
    """A rich table of the Pareto members, sorted by the first objective, and below them,
    apart, the FP reference (row ``FP``) when the study has one."""
    from rich.table import Table

    metrics = [m for m, _ in summary["objectives"]]
    reference = summary.get("reference")
    columns = list(metrics)
    if reference is not None and FID_RATIO not in metrics:
        columns.append(FID_RATIO)
    table = Table(title=f"Pareto front (hypervolume {summary['hypervolume']:.4g})")
    table.add_column("trial")
    table.add_column("run")
    for column in columns:
        table.add_column(column, justify="right")
    members = [r for r in summary["records"] if r["pareto"]]
    members.sort(key=lambda r: r["metrics"].get(metrics[0], math.inf))
    for record in members:
        table.add_row(str(record["trial_id"]), record["run_id"][:12], *_cells(record, columns))
    if reference is not None:
        table.add_section()
        fp = {**reference, "metrics": {**reference["metrics"], FID_RATIO: 1.0}}
        table.add_row(FP_ROW, reference["run_id"][:12], *_cells(fp, columns), style="italic")
        table.caption = (
            f"{FP_ROW}: the FP teacher scored with the trials' settings "
            "(reference run; not a trial, not in the front)"
        )
    return table


def _cells(record: dict[str, Any], columns: list[str]) -> list[str]:
    values = [record["metrics"].get(column) for column in columns]
    return ["-" if value is None else f"{value:.4g}" for value in values]
