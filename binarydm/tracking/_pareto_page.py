"""``pareto.html``: the study's Pareto panels as hand-written SVG in one small page.

The MLflow UI shows an HTML artifact in a sandboxed frame loaded from a ``blob:`` URL, so
the page has to carry everything it draws: a relative ``<script src>`` resolves to
nothing there, and the machine may be offline. Inlining plotly.js made every study's page
4.6 MB; SVG needs no script at all. Each point is labelled with its trial number and its
``<title>`` is the browser's tooltip: objectives, then the searched params, then the fixed
ones. The page is a few KB per trial and opens the same from the UI or a downloaded file.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

from binarydm.tracking._pareto_layout import (
    DOMINATED_COLOR,
    FP_COLOR,
    FP_LABEL,
    PARETO_COLOR,
    axis_label,
    finite,
    fp_in_panel,
    front,
    joins_front,
)

MAX_HOVER_PARAMS = 24
WIDTH, HEIGHT = 460, 390
#: Room for the caption, tick labels and axis titles around the plotting area
#: (left, right, top, bottom).
MARGIN = (78, 16, 24, 48)
TICKS = 5
#: A panel whose trials fill less than this share of an axis, because the FP point is far
#: away, gets a second panel zoomed on the trials.
SQUEEZED = 0.25
#: Where a trial's number goes beside its point, tried in turn until it overlaps no other
#: label: (dx, dy, text-anchor).
LABEL_SPOTS = ((7, -6, "start"), (-7, -6, "end"), (7, 14, "start"), (-7, 14, "end"))


def hover_text(point: Mapping[str, Any], metrics: Sequence[str]) -> str:
    """A trial's tooltip: objectives, the searched params (what tells trials apart), the rest."""
    lines = [f"trial {point['trial_id']}" + (" (Pareto)" if point.get("pareto") else "")]
    lines += [f"{m} = {point[m]:.6g}" for m in metrics]
    params = point.get("params") or {}
    searched = sorted(k for k in point.get("searched") or () if k in params)
    fixed = sorted(k for k in params if k not in searched)
    shown = (searched + fixed)[:MAX_HOVER_PARAMS]
    if searched:
        lines.append("searched:")
        lines += [f"  {k} = {params[k]}" for k in shown if k in searched]
    if fixed and len(shown) > len(searched):
        lines.append("fixed:")
        lines += [f"  {k} = {params[k]}" for k in shown if k not in searched]
    if len(params) > len(shown):
        lines.append(f"... {len(params) - len(shown)} more params")
    return "\n".join(lines)


def fp_hover_text(fp: Mapping[str, Any], metrics: Sequence[str]) -> str:
    lines = [FP_LABEL, "not a trial, not in the front"]
    lines += [f"{m} = {fp[m]:.6g}" for m in metrics if finite(fp.get(m))]
    return "\n".join(lines)


def nice_ticks(low: float, high: float, count: int = TICKS) -> list[float]:
    """About ``count`` round values (1, 2, 2.5 or 5 times a power of ten) from low to high."""
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    first = math.ceil(low / step - 1e-9)
    return [k * step for k in range(first, math.floor(high / step + 1e-9) + 1)]


def _span(values: Sequence[float]) -> tuple[float, float]:
    """The axis range: the values plus 8 % on each side (a lone value gets a range of its own)."""
    if not values:
        return 0.0, 1.0
    low, high = min(values), max(values)
    pad = (high - low) * 0.08 or abs(low) * 0.1 or 1.0
    return low - pad, high + pad


class _Axes:
    """Data -> pixel coordinates of one panel."""

    def __init__(self, xs: Sequence[float], ys: Sequence[float]):
        self.x_range, self.y_range = _span(xs), _span(ys)
        left, right, top, bottom = MARGIN
        self.box = (left, top, WIDTH - right, HEIGHT - bottom)

    def px(self, x: float, y: float) -> tuple[float, float]:
        (x0, x1), (y0, y1) = self.x_range, self.y_range
        left, top, right, bottom = self.box
        return (
            round(left + (x - x0) / (x1 - x0) * (right - left), 1),
            round(bottom - (y - y0) / (y1 - y0) * (bottom - top), 1),
        )


def _frame(axes: _Axes, x_title: str, y_title: str) -> list[str]:
    left, top, right, bottom = axes.box
    parts = [f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" '
             'fill="white" stroke="#444"/>']  # fmt: skip
    for value in nice_ticks(*axes.x_range):
        x, _ = axes.px(value, axes.y_range[0])
        parts.append(f'<line class="grid" x1="{x}" y1="{top}" x2="{x}" y2="{bottom}"/>')
        parts.append(f'<text x="{x}" y="{bottom + 16}" text-anchor="middle">{value:.6g}</text>')
    for value in nice_ticks(*axes.y_range):
        _, y = axes.px(axes.x_range[0], value)
        parts.append(f'<line class="grid" x1="{left}" y1="{y}" x2="{right}" y2="{y}"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4}" text-anchor="end">{value:.6g}</text>')
    middle = (top + bottom) / 2
    parts.append(f'<text class="title" x="{(left + right) / 2}" y="{HEIGHT - 10}" '
                 f'text-anchor="middle">{html.escape(x_title)}</text>')  # fmt: skip
    parts.append(f'<text class="title" x="16" y="{middle}" text-anchor="middle" '
                 f'transform="rotate(-90 16 {middle})">{html.escape(y_title)}</text>')  # fmt: skip
    return parts


def _star(cx: float, cy: float, radius: float = 9.0) -> str:
    corners = []
    for k in range(10):
        r = radius if k % 2 == 0 else radius * 0.45
        angle = math.pi / 2 + k * math.pi / 5
        corners.append(f"{cx + r * math.cos(angle):.1f},{cy - r * math.sin(angle):.1f}")
    return " ".join(corners)


def _label_spots(labels: Sequence[tuple[float, float, str]], first: Sequence[bool]) -> list[str]:
    """The ``<text>`` attributes of each (x, y, text) label beside its point, or "" where
    every spot overlaps a point or a label placed before (the point keeps its tooltip).
    Labels marked ``first`` (the front) are placed before the others, so they are never the
    ones left out."""
    taken = [(cx - 5, cy - 5, cx + 5, cy + 5) for cx, cy, _ in labels]  # the points
    spots = [""] * len(labels)
    for index in sorted(range(len(labels)), key=lambda i: not first[i]):
        cx, cy, text = labels[index]
        width = 6.2 * len(text) + 2
        for dx, dy, anchor in LABEL_SPOTS:
            x0 = cx + dx if anchor == "start" else cx + dx - width
            box = (x0, cy + dy - 10, x0 + width, cy + dy + 1)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3]
                       for b in taken):  # fmt: skip
                taken.append(box)
                spots[index] = f'x="{cx + dx}" y="{cy + dy}" text-anchor="{anchor}"'
                break
    return spots


def squeezed(points, fp, x: str, y: str) -> bool:
    """Whether the FP point, far from every trial, squeezes the trials into a corner."""
    if not points or not fp_in_panel(fp, x, y):
        return False
    for key in (x, y):
        values = [p[key] for p in points]
        full = max(*values, fp[key]) - min(*values, fp[key])
        if full > 0 and max(values) - min(values) < SQUEEZED * full:
            return True
    return False


def _panel(points, x, y, directions, metrics, fp, join: bool, caption: str = "") -> str:
    shown_fp = fp_in_panel(fp, x, y)
    extra = [fp] if shown_fp else []
    axes = _Axes([p[x] for p in [*points, *extra]], [p[y] for p in [*points, *extra]])
    parts = _frame(axes, axis_label(x, directions), axis_label(y, directions))
    if caption:
        parts.append(f'<text class="caption" x="{MARGIN[0]}" y="15">{html.escape(caption)}</text>')
    members = front(points, x, y)
    if join and len(members) > 1:
        line = " ".join(f"{px},{py}" for px, py in (axes.px(p[x], p[y]) for p in members))
        parts.append(f'<polyline points="{line}" fill="none" stroke="{PARETO_COLOR}"/>')
    drawn = [(p, False) for p in points if not p.get("pareto")] + [(p, True) for p in members]
    centres = [axes.px(p[x], p[y]) for p, _ in drawn]
    labels = [(cx, cy, str(p["trial_id"])) for (p, _), (cx, cy) in zip(drawn, centres, strict=True)]
    spots = _label_spots(labels, [pareto for _, pareto in drawn])
    for (point, pareto), (cx, cy), spot in zip(drawn, centres, spots, strict=True):
        color, radius = (PARETO_COLOR, 6) if pareto else (DOMINATED_COLOR, 4.5)
        tip = html.escape(hover_text(point, metrics))
        label = f'<text class="label" {spot}>{point["trial_id"]}</text>' if spot else ""
        parts.append(
            f'<g class="point"><title>{tip}</title><circle cx="{cx}" cy="{cy}" r="{radius}" '
            f'fill="{color}" stroke="black" stroke-width="0.6"/>{label}</g>'
        )
    if shown_fp:
        cx, cy = axes.px(fp[x], fp[y])
        tip = html.escape(fp_hover_text(fp, metrics))
        parts.append(f'<g class="point fp"><title>{tip}</title><polygon points="{_star(cx, cy)}" '
                     f'fill="{FP_COLOR}" stroke="black" stroke-width="0.6"/></g>')  # fmt: skip
    if not points:
        left, top, right, bottom = axes.box
        parts.append(f'<text x="{(left + right) / 2}" y="{(top + bottom) / 2}" '
                     'text-anchor="middle">no trial has every objective</text>')  # fmt: skip
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
            f'viewBox="0 0 {WIDTH} {HEIGHT}">{"".join(parts)}</svg>')  # fmt: skip


STYLE = (
    "body{font-family:sans-serif;font-size:13px;margin:12px}"
    f"svg{{font-size:11px;margin:0 8px 8px 0;width:{WIDTH}px;max-width:100%;height:auto}}"
    ".grid{stroke:#e6e6e6}.title{font-size:12px}"
    ".label{font-size:10px}.caption{font-size:11px;fill:#555}.point{cursor:help}"
    ".point:hover circle,.point:hover polygon{stroke-width:2}"
    ".legend span{margin-right:16px}.legend i{display:inline-block;width:10px;height:10px;"
    "border:1px solid black;border-radius:50%;margin-right:4px;vertical-align:-1px}"
)


def pareto_page(
    points: Sequence[Mapping[str, Any]],
    panels: Sequence[tuple[str, str]],
    directions: dict[str, str],
    metrics: Sequence[str],
    fp: Mapping[str, Any] | None = None,
) -> str:
    """The standalone page: a heading, a legend and one SVG panel per objective pair."""
    members = sum(bool(p.get("pareto")) for p in points)
    title = f"Pareto front: {members} of {len(points)} trials"
    join = joins_front(panels)
    svgs = []
    for x, y in panels:
        svgs.append(_panel(points, x, y, directions, metrics, fp, join))
        if squeezed(points, fp, x, y):
            zoom = "zoomed on the trials (the FP teacher is off this scale)"
            svgs.append(_panel(points, x, y, directions, metrics, None, join, caption=zoom))
    legend = [("dominated", DOMINATED_COLOR), ("Pareto", PARETO_COLOR)]
    if any(fp_in_panel(fp, x, y) for x, y in panels):
        legend.append((FP_LABEL, FP_COLOR))
    keys = "".join(
        f'<span><i style="background:{c}"></i>{html.escape(n)}</span>' for n, c in legend
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
        f"<h3>{html.escape(title)}</h3><p class='legend'>{keys}</p>"
        # Side by side while they fit, else one under the other, shrunk to a narrow frame
        # (the MLflow UI's artifact view beside its assistant panel is about 600 px wide).
        "<div style='display:flex;flex-wrap:wrap'>"
        f"{''.join(svgs)}</div><p>Numbers are trial numbers (where they would overlap, "
        "only the point); hover a point for its objectives and params (searched ones "
        "first). trials.csv has every value.</p>"
        "</body></html>"
    )
