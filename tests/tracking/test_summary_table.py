"""The parent run's trials table: rows, CSV round trip, HTML links, the FP row."""

from __future__ import annotations

import csv
import io

from binarydm.tracking._summary_table import summary_rows, to_csv, to_html

RECORDS = [
    {"trial_id": 0, "run_id": "a" * 32, "status": "FINISHED", "pareto": True, "tags": {},
     "metrics": {"fid": 12.5, "ops_g": 1.0, "fid_ratio_to_fp": 1.25},
     "params": {"method.lrm.rank_divisor": "4", "training.lr": "2e-05"}},
    {"trial_id": 1, "run_id": "b" * 32, "status": "KILLED", "pareto": False,
     "tags": {"state": "PRUNED"}, "metrics": {"proxy/test_loss": 0.07},
     "params": {"method.lrm.rank_divisor": "8", "training.lr": "1e-04"}},
]  # fmt: skip
REFERENCE = {"run_id": "f" * 32, "metrics": {"fid": 10.0, "ops_g": 4.0}}


def test_rows_hold_state_pareto_objectives_and_searched_params():
    columns, rows = summary_rows(RECORDS, ["fid", "ops_g"], ["method.lrm.rank_divisor"], REFERENCE)
    assert columns == ["trial", "state", "pareto", "fid", "ops_g", "fid_ratio_to_fp",
                       "method.lrm.rank_divisor", "run_id"]  # fmt: skip
    assert rows[0] == {"trial": "0", "state": "FINISHED", "pareto": "true", "fid": "12.5",
                       "ops_g": "1", "fid_ratio_to_fp": "1.25",
                       "method.lrm.rank_divisor": "4", "run_id": "a" * 32}  # fmt: skip
    assert rows[1]["state"] == "PRUNED" and rows[1]["fid"] == "" and rows[1]["pareto"] == "false"
    assert rows[2] == {"trial": "FP", "state": "reference", "pareto": "", "fid": "10",
                       "ops_g": "4", "fid_ratio_to_fp": "1", "method.lrm.rank_divisor": "",
                       "run_id": "f" * 32}  # fmt: skip
    parsed = list(csv.DictReader(io.StringIO(to_csv(columns, rows))))
    assert parsed == rows


def test_without_a_reference_there_is_no_ratio_column_nor_fp_row():
    columns, rows = summary_rows(RECORDS, ["fid"], [], None)
    assert columns == ["trial", "state", "pareto", "fid", "run_id"] and len(rows) == 2


def test_html_links_each_run_in_the_ui_window_and_marks_the_front():
    columns, rows = summary_rows(RECORDS, ["fid"], ["training.lr"], REFERENCE)
    page = to_html(columns, rows, "7", "study lrm_rank: 2 trials")
    # The run's page in the UI's ML view: without the query a fresh browser opens GenAI's.
    run_page = f"/#/experiments/7/runs/{'a' * 32}?workflowType=machine_learning"
    link = f'<a href="{run_page}" target="_top">{"a" * 12}</a>'
    assert link in page and page.count('<tr class="pareto">') == 1
    assert "<th>training.lr</th>" in page and "<td>0.0001</td>" in page  # rounded to read
    exact = summary_rows([{**RECORDS[0], "metrics": {"fid": 18.289072569590054}}], ["fid"], [])
    assert exact[1][0]["fid"] == "18.289072569590054"  # the CSV keeps every digit
    assert "<td>18.2891</td>" in to_html(*exact, "7", "t")
