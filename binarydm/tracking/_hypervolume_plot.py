"""The hypervolume of a study's finished trials against wall-clock time, as a PNG.

One step line per study (``bdm-search`` logs its own on the parent run as
``hypervolume_vs_time.png``; ``benchmarks/early_stopping_hv.py`` draws several studies
against one reference point). Matplotlib only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.figure import Figure

PNG_NAME = "hypervolume_vs_time.png"
JSON_NAME = "hypervolume_history.json"


def hypervolume_figure(
    histories: Mapping[str, Sequence[tuple[float, float]]],
    *,
    title: str = "Hypervolume of the finished trials",
    styles: Mapping[str, Mapping[str, object]] | None = None,
) -> Figure:
    """Step lines of ``{label: [(seconds since the first trial started, hypervolume)]}``.

    ``styles``: extra matplotlib keywords per label (colour, line style)."""
    figure = Figure(figsize=(7, 4.2), dpi=120)
    axes = figure.subplots()
    for label, history in histories.items():
        if not history:
            continue
        times = [0.0, *(t / 60 for t, _ in history)]
        volumes = [0.0, *(v for _, v in history)]
        axes.step(times, volumes, where="post", label=label, **dict((styles or {}).get(label, {})))
    axes.set_xlabel("wall-clock minutes since the first trial started")
    axes.set_ylabel("hypervolume")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if len(histories) > 1 or any(label for label in histories):
        axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def log_hypervolume_history(tracker, history: Mapping[str, Any]) -> None:
    """``hypervolume_vs_time.png`` and ``hypervolume_history.json`` on the study's parent
    run (a ``StudyTracker``). ``history``: ``{"reference_point", "objectives",
    "first_trial_start_unix", "points": [{"elapsed_s", "hypervolume", "trials_finished"}]}``
    (``search.summarize`` builds it)."""
    run_id = tracker.parent_run_id()
    steps = [(p["elapsed_s"], p["hypervolume"]) for p in history["points"]]
    tracker.client.log_dict(run_id, dict(history), JSON_NAME)
    tracker.log_figure(run_id, hypervolume_figure({tracker.study: steps}), PNG_NAME)
