"""The study's trials as one table on its parent run: ``trials.csv`` and ``trials.html``.

One row per trial (trial number, state, Pareto flag, the objectives, ``fid_ratio_to_fp``,
the searched params, the run id) and, last, the FP reference row. MLflow's artifact view
shows the CSV as a table; the HTML page links each run's page in the MLflow UI.
"""

from __future__ import annotations

import csv
import html
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

from binarydm.metric_contract import FID_RATIO_TO_FP as FID_RATIO
from binarydm.tracking._runs import ui_page

CSV_NAME = "trials.csv"
HTML_NAME = "trials.html"


def _state(record: Mapping[str, Any]) -> str:
    return record.get("tags", {}).get("state") or record["status"]


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.17g}"  # exact in the CSV; the HTML page rounds for reading
    return str(value)


def _shown(value: str) -> str:
    """A table cell as the HTML page shows it: numbers to 6 significant digits."""
    try:
        number = float(value)
    except ValueError:
        return value
    return value if value.isdigit() else f"{number:.6g}"


def summary_rows(
    records: Sequence[Mapping[str, Any]],
    metrics: Sequence[str],
    searched: Sequence[str],
    reference: Mapping[str, Any] | None = None,
) -> tuple[list[str], list[dict[str, str]]]:
    """(columns, rows) of the table: ``records`` are ``load_study_results``'s (with
    ``pareto`` set), ``reference`` ``load_reference``'s FINISHED run or None."""
    ratio = [FID_RATIO] if reference is not None and FID_RATIO not in metrics else []
    columns = ["trial", "state", "pareto", *metrics, *ratio, *searched, "run_id"]
    rows = []
    for record in records:
        row = {
            "trial": str(record["trial_id"]),
            "state": _state(record),
            "pareto": "true" if record.get("pareto") else "false",
            "run_id": record["run_id"],
        }
        row.update({m: _cell(record["metrics"].get(m)) for m in (*metrics, *ratio)})
        row.update({p: record["params"].get(p, "") for p in searched})
        rows.append(row)
    if reference is not None:
        row = {"trial": "FP", "state": "reference", "pareto": "", "run_id": reference["run_id"]}
        row.update({m: _cell(reference["metrics"].get(m)) for m in metrics})
        row.update({FID_RATIO: "1" if ratio else row.get(FID_RATIO, "")})
        rows.append({c: row.get(c, "") for c in columns})
    return columns, rows


def to_csv(columns: Sequence[str], rows: Sequence[Mapping[str, str]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def to_html(
    columns: Sequence[str], rows: Sequence[Mapping[str, str]], experiment_id: str, title: str
) -> str:
    """A standalone page; run ids link their run's page in the UI's own window (the
    artifact view shows the page in a frame), in the UI's ML view (``ui_page``)."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for column in columns:
            raw = row.get(column, "")
            value = html.escape(raw if column in ("trial", "run_id") else _shown(raw))
            if column == "run_id" and value:
                link = "/" + html.escape(ui_page(experiment_id, raw))
                value = f'<a href="{link}" target="_top">{value[:12]}</a>'
            cells.append(f"<td>{value}</td>")
        style = ' class="pareto"' if row.get("pareto") == "true" else ""
        body.append(f"<tr{style}>{''.join(cells)}</tr>")
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;font-size:13px}table{border-collapse:collapse}"
        "th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "th{background:#f3f3f3}tr.pareto td{background:#fdecea;font-weight:600}"
        f"</style></head><body><h3>{html.escape(title)}</h3>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
        "<p>Highlighted: the Pareto front. FP: the FP teacher scored with the trials' "
        "evaluation settings (not a trial).</p></body></html>"
    )


def log_summary_table(
    tracker,
    records: Sequence[Mapping[str, Any]],
    metrics: Sequence[str],
    searched: Sequence[str],
    reference: Mapping[str, Any] | None = None,
) -> None:
    """``trials.csv`` and ``trials.html`` on the study's parent run (a ``StudyTracker``)."""
    columns, rows = summary_rows(records, metrics, searched, reference)
    run_id = tracker.parent_run_id()
    tracker.log_text(run_id, to_csv(columns, rows), CSV_NAME)
    title = f"study {tracker.study}: {len(records)} trials"
    tracker.log_text(run_id, to_html(columns, rows, tracker.experiment_id, title), HTML_NAME)
