"""Pareto plots of a study: a static PNG (matplotlib) and an offline interactive HTML (plotly).

Each objective pair gets one scatter panel; Pareto members are highlighted, and
with exactly two objectives they are joined into the front. Points missing an
objective (failed or pruned trials) are left out. The study's FP teacher, when it
was scored (its reference run), is a point of its own in every panel where it has
both values: a star, never part of the front. The HTML embeds plotly.js, so it
opens without network access (MLflow's own plotly logging links a CDN).
"""

from __future__ import annotations

import html
import itertools
import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from matplotlib.figure import Figure

PNG_NAME = "pareto.png"
HTML_NAME = "pareto.html"
MAX_HOVER_PARAMS = 24
DOMINATED_COLOR = "#9e9e9e"
PARETO_COLOR = "#d62728"
FP_COLOR = "#1f77b4"
FP_LABEL = "FP teacher (reference)"


class ArtifactLogger(Protocol):
    """Where the plots go: a ``StudyTracker`` (typed by what is used, so no import of it)."""

    def log_figure(self, run_id: str, figure: Any, name: str) -> None: ...

    def log_text(self, run_id: str, text: str, name: str) -> None: ...


def _finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and math.isfinite(value)


def _complete(points: Sequence[Mapping[str, Any]], metrics: list[str]) -> list[Mapping[str, Any]]:
    return [p for p in points if all(_finite(p.get(m)) for m in metrics)]


def _fp_in_panel(fp: Mapping[str, Any] | None, x: str, y: str) -> bool:
    # The FP model has no trial number: the one-objective panel (x = trial_id) leaves it out.
    return fp is not None and _finite(fp.get(x)) and _finite(fp.get(y))


def _panels(metrics: list[str]) -> list[tuple[str, str]]:
    # One objective has no pair: plot it against the trial number instead.
    if len(metrics) == 1:
        return [("trial_id", metrics[0])]
    return list(itertools.combinations(metrics, 2))


def _axis_label(metric: str, directions: dict[str, str]) -> str:
    if metric not in directions:
        return metric
    better = "lower" if directions[metric] == "minimize" else "higher"
    return f"{metric} ({better} is better)"


def _grid(n_panels: int) -> tuple[int, int]:
    cols = min(3, n_panels)
    return math.ceil(n_panels / cols), cols


def _front(points: list[Mapping[str, Any]], x: str, y: str) -> list[Mapping[str, Any]]:
    return sorted((p for p in points if p.get("pareto")), key=lambda p: (p[x], p[y]))


def _matplotlib_figure(
    points: list[Mapping[str, Any]],
    panels: list[tuple[str, str]],
    directions: dict[str, str],
    fp: Mapping[str, Any] | None = None,
) -> Figure:
    rows, cols = _grid(len(panels))
    figure = Figure(figsize=(4.8 * cols, 4.2 * rows), layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False).ravel()
    for ax, (x, y) in zip(axes, panels, strict=False):
        rest = [p for p in points if not p.get("pareto")]
        front = _front(points, x, y)
        ax.scatter(
            [p[x] for p in rest], [p[y] for p in rest], c=DOMINATED_COLOR, s=24, label="dominated"
        )
        ax.scatter(
            [p[x] for p in front],
            [p[y] for p in front],
            c=PARETO_COLOR,
            s=42,
            edgecolors="black",
            linewidths=0.6,
            label="Pareto",
            zorder=3,
        )
        # In more than two dimensions a 2-D projection of the front is not a curve: join only
        # when the panel shows the whole objective space.
        if len(panels) == 1 and x != "trial_id":
            ax.plot([p[x] for p in front], [p[y] for p in front], c=PARETO_COLOR, lw=1.2)
        for p in front:
            ax.annotate(
                str(p["trial_id"]),
                (p[x], p[y]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
        if _fp_in_panel(fp, x, y):
            ax.scatter(
                [fp[x]], [fp[y]], c=FP_COLOR, marker="*", s=160, edgecolors="black",
                linewidths=0.6, label=FP_LABEL, zorder=4,
            )  # fmt: skip
        ax.set_xlabel(_axis_label(x, directions))
        ax.set_ylabel(_axis_label(y, directions))
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
    figure.suptitle(f"Pareto front: {len(_front(points, *panels[0]))} of {len(points)} trials")
    return figure


def _hover_text(point: Mapping[str, Any], metrics: list[str]) -> str:
    lines = [f"<b>trial {point['trial_id']}</b>" + (" (Pareto)" if point.get("pareto") else "")]
    lines += [f"{m} = {point[m]:.6g}" for m in metrics]
    # The searched params first (in bold): they are what tells two trials apart.
    searched = [k for k in point.get("searched") or () if k in (point.get("params") or {})]
    params = sorted(
        (point.get("params") or {}).items(), key=lambda kv: (kv[0] not in searched, kv[0])
    )
    lines += [
        f"<b>{html.escape(f'{k} = {v}')}</b>" if k in searched else html.escape(f"{k} = {v}")
        for k, v in params[:MAX_HOVER_PARAMS]
    ]
    if len(params) > MAX_HOVER_PARAMS:
        lines.append(f"... {len(params) - MAX_HOVER_PARAMS} more params")
    return "<br>".join(lines)


def _fp_hover_text(fp: Mapping[str, Any], metrics: list[str]) -> str:
    lines = [f"<b>{FP_LABEL}</b>", "not a trial, not in the front"]
    lines += [f"{m} = {fp[m]:.6g}" for m in metrics if _finite(fp.get(m))]
    return "<br>".join(lines)


def _plotly_html(
    points: list[Mapping[str, Any]],
    panels: list[tuple[str, str]],
    directions: dict[str, str],
    metrics: list[str],
    fp: Mapping[str, Any] | None = None,
) -> str:
    from plotly import graph_objects as go
    from plotly.subplots import make_subplots

    rows, cols = _grid(len(panels))
    figure = make_subplots(rows=rows, cols=cols, horizontal_spacing=0.08, vertical_spacing=0.12)
    fp_shown = False
    for index, (x, y) in enumerate(panels):
        row, col = divmod(index, cols)
        groups = (
            ("dominated", [p for p in points if not p.get("pareto")], DOMINATED_COLOR, 7),
            ("Pareto", _front(points, x, y), PARETO_COLOR, 10),
        )
        for name, members, color, size in groups:
            mode = (
                "lines+markers"
                if name == "Pareto" and len(panels) == 1 and x != "trial_id"
                else "markers"
            )
            figure.add_trace(
                go.Scatter(
                    x=[p[x] for p in members],
                    y=[p[y] for p in members],
                    mode=f"{mode}+text",
                    # Each point labelled with its trial number (the hover has the rest).
                    text=[str(p["trial_id"]) for p in members],
                    textposition="top center",
                    textfont={"size": 10},
                    name=name,
                    legendgroup=name,
                    showlegend=index == 0,
                    marker={"color": color, "size": size, "line": {"width": 0.5, "color": "black"}},
                    hovertext=[_hover_text(p, metrics) for p in members],
                    hoverinfo="text",
                ),
                row=row + 1,
                col=col + 1,
            )
        if _fp_in_panel(fp, x, y):
            figure.add_trace(
                go.Scatter(
                    x=[fp[x]],
                    y=[fp[y]],
                    mode="markers",
                    name=FP_LABEL,
                    legendgroup=FP_LABEL,
                    showlegend=not fp_shown,
                    marker={
                        "color": FP_COLOR,
                        "size": 16,
                        "symbol": "star",
                        "line": {"width": 0.5, "color": "black"},
                    },
                    hovertext=[_fp_hover_text(fp, metrics)],
                    hoverinfo="text",
                ),
                row=row + 1,
                col=col + 1,
            )
            fp_shown = True
        figure.update_xaxes(title_text=_axis_label(x, directions), row=row + 1, col=col + 1)
        figure.update_yaxes(title_text=_axis_label(y, directions), row=row + 1, col=col + 1)
    figure.update_layout(
        title=f"Pareto front: {sum(bool(p.get('pareto')) for p in points)} of {len(points)} trials",
        height=420 * rows,
        width=480 * cols + 120,
        template="plotly_white",
    )
    # Self-contained: the artifact must open from MLflow's UI or a laptop without network.
    return figure.to_html(include_plotlyjs=True, full_html=True)


def pareto_plots(
    points: Sequence[Mapping[str, Any]],
    objectives: Sequence[tuple[str, str]],
    fp: Mapping[str, Any] | None = None,
) -> tuple[Figure, str]:
    """The PNG-ready matplotlib figure and the interactive HTML of a study's trials.

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
    complete, panels, directions, _ = _layout(points, objectives)
    return _matplotlib_figure(complete, panels, directions, fp)


def pareto_html(
    points: Sequence[Mapping[str, Any]],
    objectives: Sequence[tuple[str, str]],
    fp: Mapping[str, Any] | None = None,
) -> str:
    """The interactive HTML page of ``pareto_plots`` alone (needs plotly)."""
    complete, panels, directions, metrics = _layout(points, objectives)
    return _plotly_html(complete, panels, directions, metrics, fp)


def _layout(points, objectives):
    if not objectives:
        raise ValueError("objectives is empty: need at least one (metric, direction)")
    metrics = [metric for metric, _ in objectives]
    return _complete(points, metrics), _panels(metrics), dict(objectives), metrics


def log_pareto_plots(
    tracker: ArtifactLogger,
    parent_run_id: str,
    points: Sequence[Mapping[str, Any]],
    objectives: Sequence[tuple[str, str]],
    fp: Mapping[str, Any] | None = None,
) -> None:
    """Log ``pareto.png`` and ``pareto.html`` on the study's parent run (``fp``: see
    ``pareto_plots``).

    Runs after every trial is in MLflow, so an environment without plotly (seen on a GPU
    image) gets the PNG and a warning instead of failing a finished study.
    """
    tracker.log_figure(parent_run_id, pareto_figure(points, objectives, fp), PNG_NAME)
    try:
        page = pareto_html(points, objectives, fp)
    except ImportError as exc:
        warnings.warn(
            f"{HTML_NAME} not logged: {exc} (pip install plotly); {PNG_NAME} was",
            RuntimeWarning,
            stacklevel=2,
        )
        return
    tracker.log_text(parent_run_id, page, HTML_NAME)
