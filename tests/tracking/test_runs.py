"""StudyTracker, readers, plots, reproducibility params and the outage buffer on real sqlite.

Creating MLflow's schema takes seconds, so one template database is migrated per
module and copied for each test: every test still gets its own real store.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import pickle
import shutil
import socket
import sys
import time
import warnings
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

from binarydm.tracking import (
    BufferedLogger,
    ParamConflictError,
    StudyTracker,
    list_studies,
    load_reference,
    load_study_results,
    load_study_summary,
    pareto_plots,
    plot_points,
    reproducibility_params,
)
from binarydm.tracking._pareto_page import nice_ticks
from binarydm.tracking._repro import GIT_COMMIT_ENV

EXPERIMENT = "binarydm-test"
OBJECTIVES = [("fid", "minimize"), ("ops_g", "minimize")]


@pytest.fixture(scope="module")
def template_db(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()  # runs the schema migrations once
    return path


@pytest.fixture
def store(template_db, tmp_path) -> str:
    path = tmp_path / "mlflow.db"
    shutil.copy(template_db, path)
    return f"sqlite:///{path}"


@pytest.fixture
def tracker(store, tmp_path) -> StudyTracker:
    return StudyTracker(store, EXPERIMENT, "lrm_rank", artifact_location=str(tmp_path / "art"))


def _closed_port_uri() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens: connections are refused at once


def _all_runs(tracker: StudyTracker):
    return tracker.client.search_runs([tracker.experiment_id])


def test_parent_and_trial_runs_are_reused_by_a_resumed_study(tracker, store, tmp_path):
    parent = tracker.parent_run_id()
    trial_3 = tracker.trial_run_id(3)
    resumed = StudyTracker(store, EXPERIMENT, "lrm_rank", artifact_location=str(tmp_path / "art"))
    assert resumed.parent_run_id() == parent
    assert resumed.trial_run_id(3) == trial_3
    assert resumed.trial_run_id(4) != trial_3
    assert len(_all_runs(tracker)) == 3

    tags = tracker.client.get_run(trial_3).data.tags
    assert tags["study"] == "lrm_rank" and tags["trial_id"] == "3"
    assert tags["bdm.role"] == "trial" and tags["mlflow.parentRunId"] == parent
    assert tracker.client.get_run(trial_3).info.status == "SCHEDULED"
    assert tracker.client.get_run(parent).data.tags["bdm.role"] == "parent"
    experiment = tracker.client.get_experiment(tracker.experiment_id)
    assert experiment.artifact_location.endswith(str(tmp_path / "art"))

    other = StudyTracker(store, EXPERIMENT, "other_study")
    assert other.parent_run_id() != parent and other.trial_run_id(3) != trial_3
    assert resumed.trial_runs() == {3: trial_3, 4: resumed.trial_run_id(4)}


def test_deleted_runs_are_ignored_and_create_races_converge_on_the_oldest(tracker, store):
    deleted = tracker.trial_run_id(0)
    tracker.client.delete_run(deleted)
    fresh = StudyTracker(store, EXPERIMENT, "lrm_rank")
    assert fresh.trial_run_id(0) != deleted

    # What two racing processes leave behind: two live runs with the same tags.
    parent = tracker.parent_run_id()
    tags = {"study": "lrm_rank", "bdm.role": "trial", "trial_id": "9", "mlflow.parentRunId": parent}
    older = tracker.client.create_run(tracker.experiment_id, start_time=1_000, tags=tags)
    tracker.client.create_run(tracker.experiment_id, start_time=2_000, tags=tags)
    assert StudyTracker(store, EXPERIMENT, "lrm_rank").trial_run_id(9) == older.info.run_id


def test_start_attempt_counts_starts_and_marks_running(tracker):
    run_id, attempt = tracker.start_attempt(5)
    assert attempt == 1 and tracker.client.get_run(run_id).info.status == "RUNNING"
    tracker.finish_trial(run_id, "FAILED", error="CUDA out of memory")
    assert tracker.start_attempt(5) == (run_id, 2)
    run = tracker.client.get_run(run_id)
    assert run.info.status == "RUNNING" and run.data.tags["attempt"] == "2"


def test_params_are_flattened_batched_and_relogged_idempotently(tracker):
    run_id = tracker.trial_run_id(1)
    config = {
        "weight": {"bases": 2, "scope_levels": 2, "kind": "binary"},
        "lrm": {"rank_divisor": 8, "axes": ["channel", "width"], "extra": {}},
        "note": "x" * (MAX_PARAM_VAL_LENGTH + 500),
        "grid": {f"p{i:03d}": i for i in range(230)},  # > 2 batches of 100
    }
    written = tracker.log_params(run_id, config)
    params = tracker.client.get_run(run_id).data.params
    assert params == written and len(params) == 230 + 7
    assert params["weight.bases"] == "2" and params["lrm.axes"] == '["channel", "width"]'
    assert params["lrm.extra"] == "{}"
    assert len(params["note"]) == MAX_PARAM_VAL_LENGTH and params["note"].endswith("[truncated]")

    # A retried attempt logs the same config again: nothing to write, nothing raised.
    assert tracker.log_params(run_id, config) == {}
    assert tracker.log_params(run_id, {"weight": {"bases": 2}, "seed": 0}) == {"seed": "0"}

    with pytest.raises(ParamConflictError, match=r"weight\.bases: logged '2', now '3'") as caught:
        tracker.log_params(run_id, {"weight": {"bases": 3}, "new_key": 1})
    shipped = pickle.loads(pickle.dumps(caught.value))  # as Ray returns it from a worker
    assert shipped.conflicts == {"weight.bases": ("2", "3")} and str(shipped) == str(caught.value)
    assert "new_key" not in tracker.client.get_run(run_id).data.params


def test_metrics_and_training_curve(tracker):
    run_id = tracker.trial_run_id(2)
    tracker.log_metrics(
        run_id, {"fid": 31.5, "ops_g": np.float32(1.25), "size_mib": float("nan"), "skip": None}
    )
    tracker.log_metrics(run_id, {"fid": 30.0}, step=10)
    metrics = tracker.client.get_run(run_id).data.metrics
    assert metrics["fid"] == 30.0 and metrics["ops_g"] == 1.25 and math.isnan(metrics["size_mib"])
    assert "skip" not in metrics
    history = tracker.client.get_metric_history(run_id, "fid")
    assert [(m.step, m.value) for m in history] == [(0, 31.5), (10, 30.0)]
    with pytest.raises(TypeError, match="'fid' must be a real number"):
        tracker.log_metrics(run_id, {"fid": "low"})

    rows = [{"step": s, "loss": 1 / (s + 1), "loss_lrm": 0.1, "loss_ebb": None} for s in range(700)]
    assert tracker.log_training_curve(run_id, rows) == 1400  # two log_batch calls of <= 1000
    loss = tracker.client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in loss) == list(range(700))
    assert len(tracker.client.get_metric_history(run_id, "loss_lrm")) == 700
    assert tracker.client.get_metric_history(run_id, "loss_ebb") == []


def test_finish_trial_sets_status_and_keeps_the_tail_of_the_error(tracker):
    run_id, _ = tracker.start_attempt(6)
    traceback = "frame\n" * 3000 + "RuntimeError: the real cause"
    tracker.finish_trial(run_id, "FAILED", error=traceback)
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FAILED" and run.info.end_time is not None
    assert len(run.data.tags["error"]) == MAX_TAG_VAL_LENGTH
    assert run.data.tags["error"].endswith("the real cause")
    assert run.data.tags["error_attempt"] == "1"

    run_id, _ = tracker.start_attempt(7)
    tracker.finish_trial(run_id, "FINISHED")
    assert tracker.client.get_run(run_id).info.status == "FINISHED"
    assert "error" not in tracker.client.get_run(run_id).data.tags
    with pytest.raises(ValueError, match="status='DONE' is invalid"):
        tracker.finish_trial(run_id, "DONE")


def test_artifacts_json_file_and_figure(tracker, tmp_path):
    from matplotlib.figure import Figure

    run_id = tracker.trial_run_id(8)
    name = tracker.log_artifact_json(run_id, "config", {"data_root": tmp_path, "bases": 2})
    assert name == "config.json"
    checkpoint = tmp_path / "model.bdm"
    checkpoint.write_bytes(b"\x00\x01packed")
    tracker.log_artifact_file(run_id, checkpoint, artifact_path="checkpoint")
    figure = Figure()
    figure.subplots().plot([0, 1], [1, 0])
    tracker.log_figure(run_id, figure, "samples.png")

    listed = {f.path for f in tracker.client.list_artifacts(run_id)}
    assert listed == {"config.json", "checkpoint", "samples.png"}
    local = Path(tracker.client.download_artifacts(run_id, "config.json", str(tmp_path)))
    assert json.loads(local.read_text()) == {"bases": 2, "data_root": str(tmp_path)}


def _finished_study(tracker: StudyTracker) -> dict[int, str]:
    """Four trials: 0, 1 and 3 complete (0 and 1 on the front), 2 failed."""
    results = {0: (20.0, 1.0), 1: (10.0, 3.0), 3: (25.0, 3.5)}
    for trial_id in range(4):
        run_id, _ = tracker.start_attempt(trial_id)
        tracker.log_params(run_id, {"weight": {"bases": 1 + trial_id % 3}})
        if trial_id in results:
            fid, ops = results[trial_id]
            tracker.log_metrics(run_id, {"fid": fid, "ops_g": ops, "size_mib": ops / 2})
            tracker.finish_trial(run_id, "FINISHED")
        else:
            tracker.finish_trial(run_id, "FAILED", error="diverged")
    runs = tracker.trial_runs()
    tracker.mark_pareto(runs, {0, 1})
    return runs


def test_pareto_tags_and_study_summary_on_the_parent(tracker, store):
    runs = _finished_study(tracker)
    tags = {t: tracker.client.get_run(r).data.tags["pareto"] for t, r in runs.items()}
    assert tags == {0: "true", 1: "true", 2: "false", 3: "false"}
    with pytest.raises(ValueError, match=r"\[42\] have no run"):
        tracker.mark_pareto(runs, {42})

    parent = tracker.log_study_summary(
        OBJECTIVES,
        reference_point={"fid": 100.0, "ops_g": 10.0},
        hypervolume=512.5,
        counts_by_state={"COMPLETE": 3, "FAIL": 1},
        study_file_text="objectives: [fid, ops_g]\n",
        study_file_name="lrm_rank.yaml",
    )
    assert parent == tracker.parent_run_id()
    run = tracker.client.get_run(parent)
    assert run.data.metrics == {
        "hypervolume": 512.5,
        "trials_total": 4.0,
        "trials_complete": 3.0,
        "trials_fail": 1.0,
    }
    assert run.data.tags["objectives"] == "fid:minimize,ops_g:minimize"
    assert run.data.tags["reference_point.fid"] == "100.0"
    listed = {f.path for f in tracker.client.list_artifacts(parent)}
    assert {"objectives.json", "lrm_rank.yaml"} <= listed

    summary = load_study_summary(EXPERIMENT, "lrm_rank", tracking_uri=store)
    assert summary["objectives"] == [
        {"metric": "fid", "direction": "minimize"},
        {"metric": "ops_g", "direction": "minimize"},
    ]
    assert summary["reference_point"] == {"fid": 100.0, "ops_g": 10.0}
    assert summary["run_id"] == parent and summary["metrics"]["hypervolume"] == 512.5
    with pytest.raises(ValueError, match="direction='lowest' is invalid"):
        tracker.log_study_summary([("fid", "lowest")], {}, 0.0, {}, "")


def test_load_study_results_round_trip(tracker, store):
    runs = _finished_study(tracker)
    StudyTracker(store, EXPERIMENT, "another").trial_run_id(0)  # must not leak in

    records = load_study_results(EXPERIMENT, "lrm_rank", tracking_uri=store)
    assert [r["trial_id"] for r in records] == [0, 1, 2, 3]
    assert {r["trial_id"]: r["run_id"] for r in records} == runs
    by_id = {r["trial_id"]: r for r in records}
    assert by_id[1]["metrics"] == {"fid": 10.0, "ops_g": 3.0, "size_mib": 1.5}
    assert by_id[1]["params"] == {"weight.bases": "2"}
    assert by_id[1]["status"] == "FINISHED" and by_id[1]["pareto"] is True
    assert by_id[2]["status"] == "FAILED" and by_id[2]["metrics"] == {}
    assert by_id[2]["tags"]["error"] == "diverged" and by_id[2]["attempt"] == 1
    assert list_studies(EXPERIMENT, tracking_uri=store) == ["another", "lrm_rank"]
    points = {p["trial_id"]: p for p in plot_points(records)}
    assert points[0] == {
        "fid": 20.0,
        "ops_g": 1.0,
        "size_mib": 0.5,
        "trial_id": 0,
        "pareto": True,
        "params": {"weight.bases": "1"},
        "searched": [],
    }

    with pytest.raises(LookupError, match="no study 'missing'.*another, lrm_rank"):
        load_study_results(EXPERIMENT, "missing", tracking_uri=store)
    with pytest.raises(LookupError, match="no active MLflow experiment named 'nope'"):
        load_study_results("nope", "lrm_rank", tracking_uri=store)


class _PanelReader(HTMLParser):
    """The SVG panels of ``pareto.html`` as a browser reads them: per panel, its points
    (label, tooltip, centre), its star, its front line and its axis titles."""

    def __init__(self):
        super().__init__()
        self.panels: list[dict] = []
        self._point: dict | None = None
        self._field: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        panel = self.panels[-1] if self.panels else None
        if tag == "svg":
            self.panels.append(
                {"points": [], "stars": [], "line": None, "titles": [], "caption": ""}
            )
        elif tag == "g" and "point" in attrs.get("class", ""):
            self._point = {"fp": "fp" in attrs["class"], "title": "", "label": ""}
            panel["stars" if self._point["fp"] else "points"].append(self._point)
        elif tag == "circle" and self._point is not None:
            self._point["at"] = (float(attrs["cx"]), float(attrs["cy"]))
        elif tag == "polyline":
            panel["line"] = [tuple(map(float, xy.split(","))) for xy in attrs["points"].split()]
        elif tag == "title" and self._point is not None:
            self._field = "title"
        elif tag == "text":
            self._field = "label" if self._point is not None else attrs.get("class")

    def handle_endtag(self, tag):
        if tag == "g":
            self._point = None
        if tag in ("title", "text"):
            self._field = None

    def handle_data(self, data):
        if self._field in ("title", "label") and self._point is not None:
            self._point[self._field] += data
        elif self._field == "title" and self.panels:  # an axis title
            self.panels[-1]["titles"].append(data)
        elif self._field == "caption":
            self.panels[-1]["caption"] += data


def _panels(page: str) -> list[dict]:
    reader = _PanelReader()
    reader.feed(page)
    return reader.panels


def test_pareto_plots_png_and_small_offline_html(tracker, tmp_path):
    points = [
        {"trial_id": 0, "fid": 20.0, "ops_g": 1.0, "size_mib": 0.5, "pareto": True},
        {"trial_id": 1, "fid": 10.0, "ops_g": 3.0, "size_mib": 1.5, "pareto": True},
        {"trial_id": 3, "fid": 25.0, "ops_g": 3.5, "size_mib": 1.7, "pareto": False},
        {"trial_id": 2, "fid": float("nan"), "ops_g": 2.0, "pareto": False},  # failed: left out
    ]
    points[0]["params"] = {"weight.bases": "1", "lrm.rank_divisor": "8"}
    points[0]["searched"] = ["lrm.rank_divisor"]
    tracker.log_pareto_plots(points, OBJECTIVES)
    parent = tracker.parent_run_id()
    png = Path(tracker.client.download_artifacts(parent, "pareto.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = Path(tracker.client.download_artifacts(parent, "pareto.html", str(tmp_path)))
    html = page.read_text()
    # Offline in the UI's sandboxed blob: frame: nothing to fetch, no script; a few KB
    # (plotly.js inlined made it 4.6 MB).
    assert "<script" not in html and "src=" not in html and "href=" not in html
    assert len(html.encode()) < 8_000
    (panel,) = _panels(html)
    by_label = {p["label"]: p for p in panel["points"]}
    assert sorted(by_label) == ["0", "1", "3"]  # each point labelled; the failed one left out
    assert by_label["0"]["title"].startswith("trial 0 (Pareto)\nfid = 20\nops_g = 1\n")
    assert by_label["3"]["title"] == "trial 3\nfid = 25\nops_g = 3.5"
    # The searched param leads the tooltip, before the fixed ones.
    assert by_label["0"]["title"].endswith(
        "searched:\n  lrm.rank_divisor = 8\nfixed:\n  weight.bases = 1"
    )
    # Drawn where the values are: fid grows to the right, ops_g upwards (smaller y).
    (x1, y1), (x0, y0), (x3, y3) = (by_label[k]["at"] for k in "103")
    assert x1 < x0 < x3 and y0 > y1 > y3
    assert panel["line"] == [(x1, y1), (x0, y0)]  # two objectives: the front joined
    assert panel["titles"] == ["fid (lower is better)", "ops_g (lower is better)"]

    figure, html_3d = pareto_plots(points, [*OBJECTIVES, ("size_mib", "minimize")])
    assert len([ax for ax in figure.axes if ax.get_visible()]) == 3  # one panel per pair
    panels = _panels(html_3d)
    assert [p["titles"][1] for p in panels] == [
        "ops_g (lower is better)", "size_mib (lower is better)", "size_mib (lower is better)"
    ]  # fmt: skip
    assert all(p["line"] is None and len(p["points"]) == 3 for p in panels)
    one_figure, one_html = pareto_plots(points, OBJECTIVES[:1])  # fid against trial number
    assert one_figure.axes[0].get_xlabel() == "trial_id"
    assert _panels(one_html)[0]["titles"][0] == "trial_id"
    empty_figure, empty_html = pareto_plots([], OBJECTIVES)
    assert empty_figure.axes and "no trial has every objective" in empty_html


def test_pareto_page_stays_small_for_a_large_study():
    # 200 trials with 24 params each, three objectives: what a GPU study logs.
    params = {f"group.key_{k}": f"value-{k}" for k in range(24)}
    points = [
        {"trial_id": n, "fid": 10.0 + n % 17, "ops_g": 1.0 + n % 5, "size_mib": 0.5 + n % 3,
         "pareto": n % 20 == 0, "params": params, "searched": ["group.key_0"]}
        for n in range(200)
    ]  # fmt: skip
    _, page = pareto_plots(points, [*OBJECTIVES, ("size_mib", "minimize")])
    assert sum(len(p["points"]) for p in _panels(page)) == 600
    assert len(page.encode()) < 1_000_000  # 0.51 MB measured; plotly.js alone was 4.6 MB


def test_pareto_page_zooms_on_trials_the_fp_point_squeezes_and_labels_never_overlap():
    # The walk-through's study: trials within 0.4 of FID 10.6, the FP teacher at 1.1; trials
    # 3..8 landed on one spot.
    values = [(10.46, 0.2281), (10.41, 0.2246), (10.82, 0.2299), *[(10.6, 0.2279)] * 6]
    points = [
        {"trial_id": n, "fid": fid, "test_loss": loss, "pareto": n == 1}
        for n, (fid, loss) in enumerate(values)
    ]
    objectives = [("fid", "minimize"), ("test_loss", "minimize")]
    fp = {"fid": 1.144, "test_loss": 0.0474}
    full, zoomed = _panels(pareto_plots(points, objectives, fp)[1])
    assert [len(full["stars"]), len(zoomed["stars"])] == [1, 0]
    assert zoomed["caption"] == "zoomed on the trials (the FP teacher is off this scale)"

    def spread(panel):
        xs = [p["at"][0] for p in panel["points"]]
        return max(xs) - min(xs)

    assert spread(zoomed) > 4 * spread(full)  # the trials spread out when zoomed
    # Four spots beside a point: of six on one spot two keep only their tooltips; the front's
    # label is always shown.
    labels = [p["label"] for p in zoomed["points"]]
    assert "1" in labels and labels.count("") == 2 and len(set(labels)) == len(labels) - 1
    assert [p["title"].split("\n")[0] for p in zoomed["points"]].count("trial 8") == 1
    # The FP teacher among the trials: no zoomed panel.
    near = [{**p, "fid": p["fid"] - 9, "test_loss": p["test_loss"] - 0.18} for p in points]
    assert len(_panels(pareto_plots(near, objectives, fp)[1])) == 1


def test_pareto_ticks_are_round_numbers():
    assert nice_ticks(0.0, 1.0) == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert nice_ticks(73.2, 312.9) == pytest.approx([100.0, 150.0, 200.0, 250.0, 300.0])
    assert nice_ticks(0.0512, 0.0893) == pytest.approx([0.06, 0.07, 0.08])


def test_pareto_plots_need_no_plotly(tracker, tmp_path, monkeypatch):
    # A GPU image without plotly once finished a whole study, then failed on the HTML plot.
    for name in [m for m in sys.modules if m == "plotly" or m.startswith("plotly.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "plotly", None)  # import plotly -> ImportError
    tracker.log_pareto_plots(
        [{"trial_id": 0, "fid": 20.0, "ops_g": 1.0, "pareto": True}], OBJECTIVES
    )
    names = {a.path for a in tracker.client.list_artifacts(tracker.parent_run_id())}
    assert {"pareto.png", "pareto.html"} <= names


def test_reproducibility_params(tmp_path, monkeypatch):
    params = reproducibility_params()
    for package in ("torch", "ray", "diffusers", "optuna", "mlflow", "binarydm"):
        assert params[f"version.{package}"] == importlib.metadata.version(package)
    assert params["hardware.cpu"] and int(params["hardware.cpu_count"]) >= 1
    assert params["hardware.gpu_count"].isdigit() and params["hardware.gpu"]
    commit = params["code.git_commit"]
    assert commit == "unknown" or len(commit) == 40

    assert reproducibility_params(code_dir=tmp_path)["code.git_commit"] == "unknown"
    monkeypatch.setenv(GIT_COMMIT_ENV, "abc123")
    assert reproducibility_params(code_dir=tmp_path)["code.git_commit"] == "abc123"


def test_mlflow_installed_as_mlflow_skinny_has_its_version(monkeypatch):
    # The GPU bundle installs mlflow-skinny alone; this venv has both distributions, so
    # the full one is hidden from the metadata lookup.
    from binarydm.tracking import _repro

    real = importlib.metadata.version

    def without_full_mlflow(name):
        if name == "mlflow":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(_repro.importlib.metadata, "version", without_full_mlflow)
    versions = _repro.package_versions(("mlflow", "no-such-package-bdm"))
    assert versions["version.mlflow"] == real("mlflow-skinny")
    assert versions["version.no-such-package-bdm"] == "not installed"


def test_tracker_pickles_without_its_client_and_builds_offline(tracker):
    parent, trial = tracker.parent_run_id(), tracker.trial_run_id(1)
    shipped = pickle.loads(pickle.dumps(tracker))
    assert shipped._client is None
    assert (shipped.parent_run_id(), shipped.trial_run_id(1)) == (parent, trial)
    started = time.monotonic()
    StudyTracker(_closed_port_uri(), EXPERIMENT, "s")  # contacts nothing until used
    assert time.monotonic() - started < 1.0
    with pytest.raises(ValueError, match="both ' and"):
        StudyTracker("sqlite://", EXPERIMENT, 'it\'s "odd"')


@pytest.fixture
def fast_failing_http(monkeypatch):
    # MLflow's defaults retry for minutes; an outage test needs the failure now.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")


def _buffer_outage(run_id: str, buffer_path: Path) -> BufferedLogger:
    """Writes to ``run_id`` while MLflow is unreachable; returns the logger that buffered them."""
    down = BufferedLogger(StudyTracker(_closed_port_uri(), EXPERIMENT, "lrm_rank"), buffer_path)
    started = time.monotonic()
    with pytest.warns(RuntimeWarning, match="unreachable") as caught:
        for step in range(5):
            assert down.log_metrics(run_id, {"loss": 1.0 / (step + 1)}, step=step) is False
        assert down.log_params(run_id, {"weight": {"bases": 2}}) is False
        assert down.set_tags(run_id, {"phase": "ebb"}) is False
        assert down.log_training_curve(run_id, [{"step": 9, "loss_lrm": 0.5}]) is False
        assert down.finish_trial(run_id, "FINISHED") is False
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1  # warned once
    assert time.monotonic() - started < 10
    assert down.pending == 9
    return down


def test_buffer_keeps_writes_during_an_outage_and_replays_them_once(
    tracker, tmp_path, fast_failing_http
):
    run_id, _ = tracker.start_attempt(0)
    buffer_path = tmp_path / "buffers" / "trial-0-rank-0.jsonl"
    _buffer_outage(run_id, buffer_path)

    # A restarted process finds the buffer and replays it against the live store.
    back = BufferedLogger(tracker, buffer_path)
    assert back.pending == 9
    assert back.flush() == 0 and back.pending == 0
    assert not buffer_path.exists() and not back.done_path.exists()
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"weight.bases": "2"} and run.data.tags["phase"] == "ebb"
    loss = tracker.client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in loss) == [0, 1, 2, 3, 4]
    assert [m.step for m in tracker.client.get_metric_history(run_id, "loss_lrm")] == [9]
    assert back.flush() == 0 and len(tracker.client.get_metric_history(run_id, "loss")) == 5
    assert back.log_metrics(run_id, {"fid": 12.0}) is True  # live again: writes go straight


def test_replay_after_a_crash_before_the_done_mark_does_not_double(
    tracker, tmp_path, fast_failing_http
):
    run_id, _ = tracker.start_attempt(0)
    buffer_path = tmp_path / "buffer.jsonl"
    _buffer_outage(run_id, buffer_path)
    saved = buffer_path.read_text()
    assert BufferedLogger(tracker, buffer_path).flush() == 0
    # As if MLflow took every entry but the process died before recording them as done.
    buffer_path.write_text(saved + '{"id": "torn", "op": "met')
    again = BufferedLogger(tracker, buffer_path)
    assert again.pending == 9  # the torn last line is skipped
    assert again.flush() == 0
    assert len(tracker.client.get_metric_history(run_id, "loss")) == 5
    assert len(tracker.client.get_metric_history(run_id, "loss_lrm")) == 1


def test_a_rejected_entry_is_dropped_without_blocking_the_rest(tracker, tmp_path, caplog):
    run_id = tracker.trial_run_id(0)
    buffer_path = tmp_path / "buffer.jsonl"
    entries = [
        {"id": "a", "op": "metrics", "run_id": "0" * 32, "metrics": [["loss", 1.0, 1, 0]]},
        {"id": "b", "op": "metrics", "run_id": run_id, "metrics": [["loss", 2.0, 1, 0]]},
    ]
    buffer_path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a rejection is not an outage: no outage warning
        assert BufferedLogger(tracker, buffer_path).flush() == 0
    assert "rejected buffered metrics" in caplog.text
    assert [m.value for m in tracker.client.get_metric_history(run_id, "loss")] == [2.0]


def test_the_reference_run_is_read_apart_from_the_trials(tracker, store, tmp_path):
    runs = _finished_study(tracker)
    reference = tracker.create_reference_run("k" * 64)
    tracker.log_metrics(reference, {"fid": 5.0, "ops_g": 9.0})
    tracker.client.set_terminated(reference, "FINISHED")
    elsewhere = StudyTracker(store, "another-experiment", "other", str(tmp_path / "art2"))
    copied = elsewhere.create_reference_run("k" * 64)
    elsewhere.client.set_terminated(copied, "FINISHED")
    elsewhere.create_reference_run("k" * 64)  # still running: not a finished reference

    records = load_study_results(EXPERIMENT, "lrm_rank", tracking_uri=store)
    assert {r["trial_id"]: r["run_id"] for r in records} == runs  # no reference among them
    assert tracker.trial_runs() == runs
    found = load_reference(EXPERIMENT, "lrm_rank", tracking_uri=store)
    assert found["run_id"] == reference and found["status"] == "FINISHED"
    assert found["reference_key"] == "k" * 64 and found["reused_from"] is None
    assert found["metrics"] == {"fid": 5.0, "ops_g": 9.0}
    assert found["tags"]["bdm.role"] == "reference"
    assert found["tags"]["mlflow.parentRunId"] == tracker.parent_run_id()
    assert tracker.client.get_run(reference).info.run_name == "fp-reference"
    StudyTracker(store, EXPERIMENT, "no-reference").parent_run_id()
    assert load_reference(EXPERIMENT, "no-reference", tracking_uri=store) is None
    # Across every experiment of the store, finished only, oldest first.
    finished = [r.info.run_id for r in tracker.finished_reference_runs("k" * 64)]
    assert finished == [reference, copied]
    assert tracker.finished_reference_runs("z" * 64) == []

    tracker.replace_reference_run(reference, copied)
    assert load_reference(EXPERIMENT, "lrm_rank", tracking_uri=store) is None
    assert tracker.client.get_run(reference).data.tags["replaced_by"] == copied


def test_pareto_plots_draw_the_fp_teacher_as_its_own_point(tracker, tmp_path):
    points = [
        {"trial_id": 0, "fid": 20.0, "ops_g": 1.0, "size_mib": 0.5, "pareto": True},
        {"trial_id": 1, "fid": 10.0, "ops_g": 3.0, "size_mib": 1.5, "pareto": True},
        {"trial_id": 2, "fid": 25.0, "ops_g": 3.5, "size_mib": 1.7, "pareto": False},
    ]
    fp = {"fid": 5.0, "ops_g": 9.0, "test_loss": 0.1}  # no size_mib: left out of its panels
    three = [*OBJECTIVES, ("size_mib", "minimize")]
    figure, page = pareto_plots(points, three, fp)
    panels = [ax for ax in figure.axes if ax.get_visible()]
    drawn = [[c.get_label() for c in ax.collections] for ax in panels]
    assert drawn[0] == ["dominated", "Pareto", "FP teacher (reference)"]
    assert all("FP teacher (reference)" not in labels for labels in drawn[1:])
    star = panels[0].collections[2].get_offsets().tolist()
    assert star == [[5.0, 9.0]]
    # Never joined to the front: only the front's own line in a two-objective plot.
    two, _ = pareto_plots(points, OBJECTIVES, fp)
    (line,) = two.axes[0].lines
    assert [5.0, 9.0] not in np.column_stack(line.get_data()).tolist()
    legend = [t.get_text() for t in two.axes[0].get_legend().get_texts()]
    assert legend == ["dominated", "Pareto", "FP teacher (reference)"]
    # The page: one star, in the one panel where the FP run has both values; in the legend.
    assert [len(p["stars"]) for p in _panels(page)] == [1, 0, 0]
    (star,) = _panels(page)[0]["stars"]
    assert (
        star["title"] == "FP teacher (reference)\nnot a trial, not in the front\nfid = 5\nops_g = 9"
    )
    assert "FP teacher (reference)</span>" in page
    one, one_page = pareto_plots(points, OBJECTIVES[:1], fp)  # against trial_id: no FP
    assert "FP teacher (reference)" not in [c.get_label() for c in one.axes[0].collections]
    assert "FP teacher (reference)" not in one_page

    tracker.log_pareto_plots(points, OBJECTIVES, fp=fp)
    parent = tracker.parent_run_id()
    html = Path(tracker.client.download_artifacts(parent, "pareto.html", str(tmp_path)))
    assert "FP teacher (reference)" in html.read_text()
