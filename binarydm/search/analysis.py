"""After a study: the Pareto front over its objectives, from MLflow alone.

Used at the end of ``bdm-search FILE`` and by ``bdm-search pareto EXPERIMENT``:
reads the child runs, marks ``pareto=true/false``, logs the hypervolume, trial
counts, plots and the Pareto members' packed checkpoints.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from binarydm.search.pareto import default_reference_point, hypervolume, pareto_front


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
    """Recompute and record the study's Pareto front; returns what was found."""
    from binarydm.tracking import load_study_results, plot_points

    metrics = [m for m, _ in objectives]
    directions = [d for _, d in objectives]
    records = load_study_results(tracker.experiment, tracker.study, tracker.tracking_uri)
    counts: dict[str, int] = {}
    for record in records:
        counts[record["status"]] = counts.get(record["status"], 0) + 1
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
    if complete:
        tracker.log_pareto_plots(plot_points(records), objectives)
    if log_checkpoints:
        for record in records:
            packed = Path(record["tags"].get("checkpoint", "")) / "model.bdm"
            if record["pareto"] and packed.is_file():
                tracker.log_artifact_file(record["run_id"], packed, "checkpoint")
    return {
        "records": records,
        "pareto_ids": sorted(pareto_ids),
        "hypervolume": volume,
        "reference_point": ref,
        "counts": counts,
        "objectives": objectives,
    }


def pareto_table(summary: dict[str, Any]):
    """A rich table of the Pareto members, sorted by the first objective."""
    from rich.table import Table

    metrics = [m for m, _ in summary["objectives"]]
    table = Table(title=f"Pareto front (hypervolume {summary['hypervolume']:.4g})")
    table.add_column("trial")
    table.add_column("run")
    for metric in metrics:
        table.add_column(metric, justify="right")
    members = [r for r in summary["records"] if r["pareto"]]
    members.sort(key=lambda r: r["metrics"].get(metrics[0], math.inf))
    for record in members:
        cells = [f"{record['metrics'][m]:.4g}" for m in metrics]
        table.add_row(str(record["trial_id"]), record["run_id"][:12], *cells)
    return table
