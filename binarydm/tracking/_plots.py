"""Pareto plots of a study: a static PNG (matplotlib) and a small offline HTML page (SVG).

Each objective pair gets one scatter panel; Pareto members are highlighted, and
with exactly two objectives they are joined into the front. Points missing an
objective (failed or pruned trials) are left out. The study's FP teacher, when it
was scored (its reference run), is a point of its own in every panel where it has
both values: a star, never part of the front. The HTML page (``_pareto_page``) is
hand-written SVG with a tooltip per point: no script to fetch or inline, so it opens
offline in the MLflow UI's artifact view.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from matplotlib.figure import Figure

from binarydm.tracking._pareto_layout import (
    DOMINATED_COLOR,
    FP_COLOR,
    FP_LABEL,
    PARETO_COLOR,
    axis_label,
    fp_in_panel,
    front,
    grid,
    joins_front,
    layout,
)
from binarydm.tracking._pareto_page import pareto_page

PNG_NAME = "pareto.png"
HTML_NAME = "pareto.html"


class ArtifactLogger(Protocol):
    """Where the plots go: a ``StudyTracker`` (typed by what is used, so no import of it)."""

    def log_figure(self, run_id: str, figure: Any, name: str) -> None: ...

    def log_text(self, run_id: str, text: str, name: str) -> None: ...


def _matplotlib_figure(
    points: list[Mapping[str, Any]],
    panels: list[tuple[str, str]],
    directions: dict[str, str],
    fp: Mapping[str, Any] | None = None,
) -> Figure:
    rows, cols = grid(len(panels))
    figure = Figure(figsize=(4.8 * cols, 4.2 * rows), layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False).ravel()
    for ax, (x, y) in zip(axes, panels, strict=False):
        rest = [p for p in points if not p.get("pareto")]
        members = front(points, x, y)
        ax.scatter(
            [p[x] for p in rest], [p[y] for p in rest], c=DOMINATED_COLOR, s=24, label="dominated"
        )
        ax.scatter(
            [p[x] for p in members],
            [p[y] for p in members],
            c=PARETO_COLOR,
            s=42,
            edgecolors="black",
            linewidths=0.6,
            label="Pareto",
            zorder=3,
        )
        if joins_front(panels):
            ax.plot([p[x] for p in members], [p[y] for p in members], c=PARETO_COLOR, lw=1.2)
        for p in members:
            ax.annotate(
                str(p["trial_id"]),
                (p[x], p[y]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
        if fp_in_panel(fp, x, y):
            ax.scatter(
                [fp[x]], [fp[y]], c=FP_COLOR, marker="*", s=160, edgecolors="black",
                linewidths=0.6, label=FP_LABEL, zorder=4,
            )  # fmt: skip
        ax.set_xlabel(axis_label(x, directions))
        ax.set_ylabel(axis_label(y, directions))
        ax.grid(alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    if not points:
        axes[0].text(
            0.5,
            0.5,
            "no trial has every objective",
            ha="center",
            va="center",
            transform=axes[0].transAxes,
        )
    # One legend for every panel: the FP point may be missing from the first one.
    entries: dict[str, Any] = {}
    for ax in axes[: len(panels)]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    axes[0].legend(list(entries.values()), list(entries), loc="best", fontsize=8)
    figure.suptitle(f"Pareto front: {len(front(points, *panels[0]))} of {len(points)} trials")
    return figure


def pareto_plots(
    points: Sequence[Mapping[str, Any]],
    objectives: Sequence[tuple[str, str]],
    fp: Mapping[str, Any] | None = None,
) -> tuple[Figure, str]:
    """The PNG-ready matplotlib figure and the HTML page of a study's trials.

    ``points``: one dict per trial with every objective metric, ``trial_id``,
    ``pareto`` (bool) and optionally ``params`` (shown on hover).
    ``objectives``: ``[(metric, "minimize"|"maximize"), ...]``.
    ``fp``: metrics of the study's FP reference run, drawn as its own point, or None.
    """
    return pareto_figure(points, objectives, fp), pareto_html(points, objectives, fp)


def pareto_figure(
    points: Sequence[Mapping[str, Any]],
    objectives: Sequence[tuple[str, str]],
    fp: Mapping[str, Any] | None = None,
) -> Figure:
    """The matplotlib figure of ``pareto_plots`` alone."""
    complete, panels, directions, _ = layout(points, objectives)
    return _matplotlib_figure(complete, panels, directions, fp)


def pareto_html(
    points: Sequence[Mapping[str, Any]],
    objectives: Sequence[tuple[str, str]],
    fp: Mapping[str, Any] | None = None,
) -> str:
    """The HTML page of ``pareto_plots`` alone: SVG panels, a tooltip per point."""
    complete, panels, directions, metrics = layout(points, objectives)
    return pareto_page(complete, panels, directions, metrics, fp)


def log_pareto_plots(
    tracker: ArtifactLogger,
    parent_run_id: str,
    points: Sequence[Mapping[str, Any]],
    objectives: Sequence[tuple[str, str]],
    fp: Mapping[str, Any] | None = None,
) -> None:
    """Log ``pareto.png`` and ``pareto.html`` on the study's parent run (``fp``: see
    ``pareto_plots``)."""
    tracker.log_figure(parent_run_id, pareto_figure(points, objectives, fp), PNG_NAME)
    tracker.log_text(parent_run_id, pareto_html(points, objectives, fp), HTML_NAME)
