"""What a user sees in the MLflow UI after a study: headless Chromium against a real server.

``mlflow server`` (SQLite backend) records a 2-trial study run by ``bdm-search``; Chromium
renders the experiment's runs table and a trial's run page, and the tests read the rendered
DOM (``--dump-dom``): the study's parent run is listed with its trials folded under it, and
a trial's page shows its metrics (objectives before timings) and the ``pareto`` tag; the
parent's ``pareto.html`` is drawn inside the artifact view's frame (read from a screenshot:
the frame's document is not in the dump). Screenshots are kept in the test's tmp dir, the
trial's also at /tmp/bdm_mlflow_ui.png for a person to look at.

MLflow 3's ``#/experiments/<id>`` opens the GenAI overview unless the address asks for the
ML view (``?workflowType=machine_learning``); the runs table is also at ``.../runs``.
"""

from __future__ import annotations

import html
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from binarydm.tracking._pareto_layout import PARETO_COLOR
from binarydm.tracking._runs import ML_VIEW_QUERY, ui_page

pytestmark = pytest.mark.timeout(900)

STUDY = "lrm_rank"
TRIALS = 1  # the parent folds its trial and the FP reference run
#: A slow server (a loaded CI machine) may answer after the virtual time budget: retry.
RENDER_ATTEMPTS = 3
SCREENSHOT_COPY = Path("/tmp/bdm_mlflow_ui.png")


@pytest.fixture(scope="module")
def ui_study(mlflow_server_factory, run_study, study_env, tmp_path_factory):
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow_ui")
    server = mlflow_server_factory(root, f"sqlite:///{root / 'mlflow.db'}", study_env)
    run_study(
        [
            "--trials", str(TRIALS), "--tracking-uri", server.url,
            # The UI is the subject, not Ray Train's fit (tests/search): inline trials.
            "--set", "workers.inline=true",
            "--set", f"storage.optuna=sqlite:///{root / 'optuna.db'}",
            "--set", f"storage.ray_results={root / 'ray_results'}",
        ],
        cwd=root, env=study_env,
    )  # fmt: skip
    client = MlflowClient(server.url)
    experiment = client.get_experiment_by_name(STUDY)
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("bdm.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    trials = [r for r in children if r.data.tags.get("bdm.role") == "trial"]
    # Under the parent: the trials and the FP reference run, nothing else.
    assert len(trials) == TRIALS and len(runs) == TRIALS + 2
    assert [r.data.tags.get("bdm.role") for r in children].count("reference") == 1
    return SimpleNamespace(
        url=server.url,
        experiment_id=experiment.experiment_id,
        parent=parent,
        children=children,
        trials=trials,
    )


def _text(dom: str) -> str:
    """The page's text as a reader sees it: tags, scripts and styles dropped, spaces collapsed."""
    body = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", body)).split())


def _render(chromium, url: str, out: Path, ready: str) -> str:
    """The DOM of ``url`` once its text holds ``ready`` (or the last attempt's)."""
    for attempt in range(RENDER_ATTEMPTS):
        dom = chromium.dump_dom(url, out.with_suffix(f".{attempt}.html"))
        if ready in _text(dom):
            break
    return dom


def test_runs_table_shows_the_study_with_its_trials_folded(chromium, ui_study, tmp_path):
    experiment, parent = ui_study.experiment_id, ui_study.parent
    url = f"{ui_study.url}/#/experiments/{experiment}/runs"
    # The parent, its trials and the study's FP reference run.
    matching = f"{len(ui_study.children) + 1} matching runs"
    dom = _render(chromium, url, tmp_path / "runs", matching)
    text = _text(dom)
    chromium.screenshot(url, tmp_path / "runs.png")

    assert matching in text, text[:3000]
    assert parent.info.run_name in text
    parent_link = f'href="#/experiments/{experiment}/runs/{parent.info.run_id}"'
    assert parent_link in dom
    for child in ui_study.children:
        assert child.info.run_id not in dom, f"{child.info.run_name} is not folded"
        assert child.info.run_name not in text
    # The parent's name cell holds the expander button that unfolds its trials.
    name_cell = re.search(
        r'col-id="attributes\.`Run Name`"((?:(?!role="gridcell").)*?)' + re.escape(parent_link),
        dom,
        flags=re.S,
    )
    assert name_cell and "<button" in name_cell[1], "no expander beside the parent run"


def test_the_printed_address_opens_the_runs_table(chromium, ui_study, tmp_path):
    """The address ``bdm-search`` prints (``?workflowType=machine_learning``) opens MLflow
    3's runs table, not its GenAI overview, whatever the browser chose last."""
    url = f"{ui_study.url}/#/experiments/{ui_study.experiment_id}?workflowType=machine_learning"
    matching = f"{len(ui_study.children) + 1} matching runs"
    text = _text(_render(chromium, url, tmp_path / "printed", matching))
    assert matching in text and ui_study.parent.info.run_name in text, text[:3000]
    assert "Detect Issues" not in text  # the GenAI overview's pop-up


def test_trial_page_shows_metrics_and_pareto_tag(chromium, ui_study, tmp_path):
    # A Pareto member: its page is the one worth a screenshot. Its address as trials.html
    # links it, in the ML view (a fresh browser opens a bare run address in GenAI's).
    trial = next(r for r in ui_study.trials if r.data.tags["pareto"] == "true")
    url = f"{ui_study.url}/{ui_page(ui_study.experiment_id, trial.info.run_id)}"
    dom = _render(chromium, url, tmp_path / "trial", "pareto")
    text = _text(dom)
    screenshot = chromium.screenshot(url, tmp_path / "trial.png")
    shutil.copyfile(screenshot, SCREENSHOT_COPY)

    assert trial.info.run_name in text and f"Parent run {ui_study.parent.info.run_name}" in text
    assert "Evaluations" not in text  # GenAI's name for runs
    # The metrics table lists them as first logged: what matters first, the launch stamps
    # and timings (timing/) after the objectives (the compare view's default axis is the
    # first one too).
    listed = re.findall(r"\b([a-z][a-z0-9_./]*) -?\d", text[text.index("Metrics (") :])
    timings = [i for i, name in enumerate(listed) if name.startswith("timing/")]
    assert timings and listed.index("fid") < timings[0] and listed.index("test_loss") < timings[0]
    for metric in ("fid", "test_loss", "ops_g", "size_mib"):
        shown = re.search(rf"\b{metric} (-?[0-9.e+-]+)", text)
        assert shown, f"metric {metric} is not on the page"
        assert float(shown[1]) == pytest.approx(trial.data.metrics[metric])
    assert "pareto : true" in text and f"trial_id : {trial.data.tags['trial_id']}" in text
    assert screenshot.stat().st_size > 10_000  # a rendered page, not a blank one


def test_pareto_page_opens_in_the_artifact_view(chromium, ui_study, tmp_path):
    """The parent's ``pareto.html`` renders inside the UI's sandboxed artifact frame: its
    Pareto points' red is on the screenshot (plotly's 4.6 MB page left the frame blank)."""
    import numpy as np
    from PIL import Image

    page = f"#/experiments/{ui_study.experiment_id}/runs/{ui_study.parent.info.run_id}"
    url = f"{ui_study.url}/{page}/artifacts/pareto.html?{ML_VIEW_QUERY}"
    red = np.array([int(PARETO_COLOR[i : i + 2], 16) for i in (1, 3, 5)])
    for attempt in range(RENDER_ATTEMPTS):
        shot = chromium.screenshot(url, tmp_path / f"pareto.{attempt}.png")
        pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
        drawn = int((np.abs(pixels - red).max(axis=2) <= 8).sum())
        if drawn >= 50:
            break
    assert drawn >= 50, f"no Pareto point drawn in the artifact view ({drawn} red pixels)"
