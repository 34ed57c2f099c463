"""What the CLI says around a study: results' location, Ray's noise kept off, ids, stores."""

from __future__ import annotations

import dataclasses
import io
import re
from pathlib import Path

import pytest
from bdm_support import LRM_STUDY
from typer.testing import CliRunner

from binarydm.cli import app
from binarydm.search._console import is_raylet_notice, results_location
from binarydm.spec import load_study

STARTUP_NOTICE = (
    "WARNING: 6 PYTHON worker processes have been started on node: 1 with address: "
    "127.0.0.1, which is 3x the maximum expected startup concurrency (2). This could be ..."
)


def test_only_the_raylet_startup_notice_is_dropped():
    assert is_raylet_notice({"lines": [STARTUP_NOTICE], "pid": "raylet"})
    assert not is_raylet_notice({"lines": ["A worker died or was killed"], "pid": "raylet"})
    assert not is_raylet_notice({"lines": [STARTUP_NOTICE], "pid": 1234})


def test_worker_output_shows_only_progress_bars_and_only_when_asked():
    """Non-verbose: a worker's log lines never reach the terminal; its tqdm_ray bar
    updates do inside ``worker_progress()`` (teacher pretraining, ``bdm-search trial``)."""
    import json

    from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC

    from binarydm.search._console import _worker_progress, shown_worker_lines, worker_progress

    bar = json.dumps({"__magic_token__": RAY_TQDM_MAGIC, "x": 3, "total": 10, "desc": "teacher"})
    batch = {"pid": 4321, "lines": ["INFO some worker log line", bar, "Traceback ..."]}
    assert shown_worker_lines(batch, progress=False) == []
    assert shown_worker_lines(batch, progress=True) == [bar]
    with worker_progress():
        assert _worker_progress.is_set()
    assert not _worker_progress.is_set()

    from binarydm.search._console import shown_batch

    assert shown_batch(batch, progress=True) == {**batch, "lines": [bar]}
    assert shown_batch(batch, progress=False) is None
    died = {"pid": "raylet", "lines": ["A worker died or was killed while executing a task"]}
    assert shown_batch(died, progress=False) == died  # Ray's errors still print
    assert shown_batch({"pid": "raylet", "lines": [STARTUP_NOTICE]}, progress=True) is None
    pending = {"pid": "autoscaler", "lines": ["Warning: resource request cannot be scheduled"]}
    assert shown_batch(pending, progress=True) is None


def test_library_notices_are_dropped_and_other_records_kept():
    import logging

    from binarydm.search._console import quiet_library_notices

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep()
    token = logging.getLogger("ray._private.authentication.authentication_token_setup")
    tables = logging.getLogger("mlflow.store.db.utils")
    for logger in (token, tables):
        logger.addHandler(handler)
    try:
        quiet_library_notices()
        quiet_library_notices()  # idempotent: one filter per logger
        assert sum(type(f).__name__ == "_DropNotices" for f in tables.filters) == 1
        token.warning("Token authentication is enabled for this Ray cluster. Set ...")
        token.warning("Token authentication is disabled for this Ray cluster. Anyone ...")
        tables.warning("Creating initial MLflow database tables...")
        tables.warning("could not migrate the database")
    finally:
        for logger in (token, tables):
            logger.removeHandler(handler)
    assert seen == [
        "Token authentication is disabled for this Ray cluster. Anyone ...",
        "could not migrate the database",
    ]


def test_progress_cell_counts_steps_with_an_eta_then_says_evaluating():
    from binarydm.search._callbacks import progress_cell, track_progress

    row = {"state": "RUNNING", "steps": 100, "seeds": 1}
    assert progress_cell(row) == ""  # no report yet
    track_progress(row, {"step": 10}, now=100.0)
    assert progress_cell(row) == "10/100"  # one report: no rate yet
    track_progress(row, {"step": 30}, now=110.0)  # 20 steps in 10 s: 70 left = 35 s
    assert progress_cell(row) == "30/100 ETA 0:35"
    track_progress(row, {"step": 100}, now=145.0)
    assert progress_cell(row) == "evaluating"
    track_progress(row, {"step": 100, "final": True, "fid": 3.0}, now=150.0)
    assert progress_cell({**row, "state": "DONE"}) == ""

    seeds = {"state": "RUNNING", "steps": 100, "seeds": 2}
    for step, now in ((50, 0.0), (100, 10.0), (20, 20.0), (60, 30.0)):
        track_progress(seeds, {"step": step}, now=now)
    # The second seed's rate: 40 steps in 10 s, 40 left.
    assert progress_cell(seeds) == "seed 2/2 60/100 ETA 0:10"
    # One seed: a step going back is a retry from a checkpoint, not another seed.
    retried = {"state": "RUNNING", "steps": 100, "seeds": 1}
    for step, now in ((40, 0.0), (60, 10.0), (50, 20.0), (70, 30.0)):
        track_progress(retried, {"step": step}, now=now)
    assert progress_cell(retried) == "70/100 ETA 0:15"


def test_live_table_fits_the_terminal_leaving_out_searched_params_that_do_not_fit():
    from rich.console import Console

    from binarydm.search._callbacks import StudyProgress

    spec = load_study(Path(LRM_STUDY).with_name("joint.yaml"), profile="quick")
    dimensions = list(spec.search.space)
    progress = StudyProgress(dimensions, spec.search.metrics, enabled=False, steps=150)
    config = {dim: 0.000123 for dim in dimensions}
    progress.rows["t0"] = {"state": "RUNNING", "metrics": {"step": 60, "loss": 0.1278},
                           "config": config, "number": 0, "steps": 150, "step": 60,
                           "first_seen": (10, 0.0), "last_seen": (60, 50.0)}  # fmt: skip

    def rendered(width):
        console = Console(width=width, record=True, file=io.StringIO())
        console.print(progress._table(width))
        return console.export_text().splitlines()

    narrow = rendered(110)
    assert len(dimensions) == 14 and max(map(len, narrow)) <= 110
    (row,) = [line for line in narrow if line.startswith("│ 0 ")]
    assert "RUNNING" in row and "60/150 ETA 1:30" in row and "0.1278" in row  # not squeezed
    caption = " ".join(" ".join(narrow).split())
    hidden = int(re.search(r"(\d+) of 14 searched params left out to fit 110 columns", caption)[1])
    assert 0 < hidden < 14
    header = " ".join(narrow[:4])
    # Headers drop the section, one part a line (weight over kind); the last ones go first.
    assert "┃ weight " in narrow[2] and "┃ kind " in narrow[3] and "stage_steps" not in header
    wide = rendered(1000)
    assert "left out" not in " ".join(wide) and "stage_steps" in " ".join(wide)


def test_results_location_opens_the_runs_table(tmp_path):
    spec = load_study(LRM_STUDY, profile="quick").resolve_paths(tmp_path)
    where = results_location(spec, "7", "http://127.0.0.1:8265")
    assert where["mlflow_ui"] == f"mlflow ui --backend-store-uri {spec.tracking.uri}"
    assert where["mlflow_url"] == (
        "http://127.0.0.1:5000/#/experiments/7?workflowType=machine_learning"
    )
    assert where["ray_dashboard"] == "http://127.0.0.1:8265"
    served = dataclasses.replace(
        spec, tracking=dataclasses.replace(spec.tracking, uri="http://u:secret@host:5000")
    )
    where = results_location(served, "7")
    assert where["mlflow_ui"] is None and "secret" not in where["mlflow_url"]
    database = dataclasses.replace(
        spec, tracking=dataclasses.replace(spec.tracking, uri="postgresql://u:secret@db/mlflow")
    )
    assert "secret" not in results_location(database, "7")["mlflow_ui"]
    assert where["mlflow_url"].endswith("host:5000/#/experiments/7?workflowType=machine_learning")


def test_sqlite_init_lock_leaves_nothing_beside_the_store(tmp_path, monkeypatch):
    from binarydm.search._preflight import sqlite_init_lock, sqlite_lock_path

    monkeypatch.setenv("BINARYDM_CACHE_DIR", str(tmp_path / "cache"))
    store = tmp_path / "work" / "optuna.db"
    store.parent.mkdir()
    with sqlite_init_lock(f"sqlite:///{store}"):
        assert sqlite_lock_path(str(store)).parent == tmp_path / "cache" / "locks"
    assert list(store.parent.iterdir()) == []


def test_interrupted_message_says_what_was_kept_and_the_exact_resume_command(tmp_path):
    from binarydm.cli import resume_command
    from binarydm.search._console import interrupted_message

    command = resume_command(
        LRM_STUDY, "quick", ["training.lr=2e-5", "data.root=/a b"], None, None, 3
    )
    assert command == (
        f"bdm-search {LRM_STUDY} --profile quick --trials 3 --set training.lr=2e-5 "
        "--set 'data.root=/a b' --resume"
    )
    spec = load_study(LRM_STUDY, profile="quick").resolve_paths(tmp_path)
    message = interrupted_message(spec, command)
    assert f"sqlite:///{tmp_path / 'mlflow.db'}" in message
    assert f"sqlite:///{tmp_path / 'optuna.db'}" in message
    assert str(tmp_path / "ray_results" / "lrm_rank") in message
    assert message.endswith(command)


def test_a_run_is_found_by_id_unique_prefix_or_study_trial_number(tmp_path):
    from mlflow import MlflowClient

    from binarydm.tracking import find_run

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("e")
    tags = {"study": "s", "bdm.role": "trial"}
    ids: list[str] = []

    def shared_letter():
        return next((c for c in "abcdef" if sum(i.startswith(c) for i in ids) > 1), None)

    while len(ids) < 17 or shared_letter() is None:  # two ids that start with one letter
        tags["trial_id"] = str(len(ids))
        ids.append(client.create_run(experiment, tags=tags).info.run_id)
    assert find_run(client, ids[3]).info.run_id == ids[3]
    assert find_run(client, ids[3][:12]).info.run_id == ids[3]
    assert find_run(client, "s:5").info.run_id == ids[5]
    first = shared_letter()
    with pytest.raises(LookupError, match="ambiguous") as ambiguous:
        find_run(client, first)
    assert all(i in str(ambiguous.value) for i in ids if i.startswith(first))
    for missing in ("zzzz", "s:99", "t:0"):
        with pytest.raises(LookupError):
            find_run(client, missing)
    # A short number is a trial's, never the prefix of the run it happens to start.
    for number in ("5", "12"):
        with pytest.raises(LookupError, match=f"looks like a trial number: pass STUDY:{number}"):
            find_run(client, number)


@pytest.mark.parametrize(
    "args",
    [["pareto", "nonexistent_study"], ["sample", "795652d63427"], ["export", "x", "--out", "o"]],
)
def test_reading_commands_refuse_a_missing_store_and_create_nothing(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert f"no MLflow store at {tmp_path / 'mlflow.db'}" in result.output
    assert list(tmp_path.iterdir()) == []


def test_sample_and_pareto_help_describe_their_own_options():
    sample_help = CliRunner().invoke(app, ["sample", "--help"]).output
    assert "overrides the file" not in sample_help and "prefix" in sample_help
    from binarydm.tracking._results import _experiment_id

    with pytest.raises(LookupError) as missing:
        _experiment_id(__import__("mlflow").MlflowClient("sqlite:///:memory:"), "nope")
    assert "tracking_uri" not in str(missing.value) and "--tracking-uri" in str(missing.value)


def _lrm_searchers(tmp_path, study_file=LRM_STUDY):
    """The quick lrm_rank study's search (or ``study_file``'s), an Optuna SQLite storage in
    ``tmp_path``, and a factory of BinaryDMOptunaSearch on it (each call: a driver's fresh
    searcher; ``continued``: the RUNNING trials it hands out first)."""
    import optuna

    from binarydm.search import build_sampler, optuna_space
    from binarydm.search._searcher import BinaryDMOptunaSearch

    search = load_study(study_file, profile="quick").search
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")

    def searcher(continued=()):
        return BinaryDMOptunaSearch(
            space=optuna_space(search), metric=search.metrics, mode=search.tune_modes,
            sampler=build_sampler(search), storage=storage, study_name="s",
            continued=continued,
        )  # fmt: skip

    return search, storage, searcher


@pytest.mark.parametrize("study_file", [LRM_STUDY, str(Path(LRM_STUDY).with_name("joint.yaml"))])
def test_a_fresh_searcher_continues_the_lost_drivers_running_trials_first(tmp_path, study_file):
    # A study recreated from a run archive has no Tune experiment: the new driver's
    # searcher hands out the trials left RUNNING (their own numbers and params), then asks
    # Optuna for new ones. joint.yaml's space is conditional (define-by-run).
    import optuna

    from binarydm.search._searcher import TRIAL_NUMBER_KEY

    search, storage, searcher = _lrm_searchers(tmp_path, study_file)
    from binarydm.search._sampling import DefineByRunSpace

    assert isinstance(searcher()._space, DefineByRunSpace) == (study_file != LRM_STUDY)
    lost = searcher()
    asked = [lost.suggest(f"t{i}") for i in range(3)]
    lost.on_trial_complete("t1", {"fid": 40.0, **dict.fromkeys(search.metrics[1:], 1.0)})
    fresh = searcher(continued=(0, 2))
    again = [fresh.suggest(f"n{i}") for i in range(3)]
    assert again[0] == asked[0] and again[1] == asked[2]  # same params, same numbers
    assert [p[TRIAL_NUMBER_KEY] for p in again] == [0, 2, 3]
    fresh.on_trial_complete("n0", {"fid": 30.0, **dict.fromkeys(search.metrics[1:], 2.0)})
    trials = optuna.load_study(study_name="s", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "RUNNING", "RUNNING"]
    assert trials[0].values[0] == 30.0 and trials[1].values[0] == 40.0


def test_a_restored_searcher_passes_over_continued_trials_settled_meanwhile(tmp_path):
    # Tune snapshots the searcher with its list of trials to continue; a later resume may
    # have FAILed some of them (orphans) before the restored searcher hands them out.
    import optuna

    from binarydm.search._searcher import TRIAL_NUMBER_KEY

    search, storage, searcher = _lrm_searchers(tmp_path)
    lost = searcher()
    for i in range(3):
        lost.suggest(f"t{i}")
    fresh = searcher(continued=(0, 1, 2, 7))  # 7: not in the study at all
    assert fresh.suggest("n0")[TRIAL_NUMBER_KEY] == 0
    fresh.save(str(tmp_path / "searcher.pkl"))
    study = optuna.load_study(study_name="s", storage=storage)
    study.tell(1, state=optuna.trial.TrialState.FAIL)
    restored = searcher()
    restored.restore(str(tmp_path / "searcher.pkl"))
    numbers = [restored.suggest(f"r{i}")[TRIAL_NUMBER_KEY] for i in range(2)]
    assert numbers == [2, 3]  # 1 FAILed, 7 absent: passed over; then a new trial


def test_the_optuna_study_names_its_objectives_on_creation_and_on_restore(tmp_path):
    import optuna

    search, storage, searcher = _lrm_searchers(tmp_path)

    first = searcher()
    study = optuna.load_study(study_name="s", storage=storage)
    assert study.metric_names == list(search.metrics)
    first.save(str(tmp_path / "searcher.pkl"))
    storage.set_study_system_attr(study._study_id, "study:metric_names", None)
    assert optuna.load_study(study_name="s", storage=storage).metric_names is None
    searcher().restore(str(tmp_path / "searcher.pkl"))
    assert optuna.load_study(study_name="s", storage=storage).metric_names == list(search.metrics)


def test_a_restored_searcher_keeps_what_the_killed_driver_told_and_says_nothing(tmp_path, caplog):
    # A driver told trial 0 COMPLETE after its last searcher checkpoint, then died; the
    # resumed driver's Tune reports the trial complete again (from its restored state).
    import logging

    import optuna

    _, storage, searcher = _lrm_searchers(tmp_path)

    first = searcher()
    assert first.suggest("t0") is not None
    first.save(str(tmp_path / "searcher.pkl"))
    first.on_trial_complete("t0", {"fid": 12.5, "test_loss": 0.25})
    restored = searcher()
    restored.restore(str(tmp_path / "searcher.pkl"))
    with caplog.at_level(logging.DEBUG, logger="binarydm"):
        restored.on_trial_complete("t0", {"fid": 99.0, "test_loss": 0.9})
    assert [r.getMessage() for r in caplog.records if r.name.startswith("binarydm")] == []
    (trial,) = optuna.load_study(study_name="s", storage=storage).trials
    assert trial.state.name == "COMPLETE" and trial.values == [12.5, 0.25]


def test_option_errors_name_the_option_and_data_root_its_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [LRM_STUDY, "--trials", "0"])
    assert result.exit_code == 2 and "--trials: search.trials=0 is invalid" in result.output
    assert "--set" not in result.output
    result = CliRunner().invoke(app, [LRM_STUDY, "--set", "data.root=/nope", "--trials", "1"])
    assert result.exit_code == 2, result.output
    assert "data.root='/nope' is invalid: no such folder" in result.output
    assert "data_root argument" not in result.output and list(tmp_path.iterdir()) == []


def test_dry_run_seconds_are_rounded_and_a_cached_teacher_costs_nothing():
    from binarydm.search import estimate_cost

    spec = load_study(LRM_STUDY, profile="quick")
    cost = estimate_cost(spec, cluster_cpus=2)
    assert cost["teacher_seconds"] > 0
    assert all(cost[k] == round(cost[k], 1) for k in ("seconds_per_run", "wall_seconds"))
    cached = estimate_cost(spec, cluster_cpus=2, teacher_cached=True)
    assert cached["teacher_seconds"] == 0
    assert cached["wall_seconds"] == pytest.approx(cost["wall_seconds"] - cost["teacher_seconds"])


def test_a_missing_study_file_offers_the_shipped_studies_not_the_folders_yaml(
    tmp_path, monkeypatch
):
    (tmp_path / "docker-compose.yaml").write_text("services: {}\n")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["validate", "lrm_rnak.yaml"])
    assert result.exit_code == 2
    assert "docker-compose" not in result.output and "lrm_rank.yaml" in result.output


def test_the_grid_samplers_last_trial_is_told_without_error():
    import optuna

    from binarydm.search._grid import TunedGridSampler

    study = optuna.create_study(sampler=TunedGridSampler({"x": [0, 1]}))
    for _ in range(2):
        trial = study.ask()
        study.tell(trial, trial.suggest_categorical("x", [0, 1]))  # Study.stop raised here
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]


def test_tunes_own_output_is_off_during_fit_unless_verbose(monkeypatch):
    import logging
    import os

    from binarydm.search._console import tune_output

    monkeypatch.delenv("RAY_AIR_NEW_OUTPUT", raising=False)
    tune_log = logging.getLogger("ray.tune")
    level = tune_log.level
    with tune_output(verbose=False):
        assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0"  # Tune's legacy engine, verbosity 0
        assert tune_log.getEffectiveLevel() == logging.ERROR
    assert "RAY_AIR_NEW_OUTPUT" not in os.environ and tune_log.level == level
    with tune_output(verbose=True):
        assert "RAY_AIR_NEW_OUTPUT" not in os.environ and tune_log.level == level


PROFILE_STUDY = """
name: replaced
settings:
  data: {source: npz, path: %s, resolution: 16, channels: 1}
  training: {steps: 400}
search:
  algorithm: random
  trials: 2
  objectives: [{metric: fid}]
  space:
    training.lr: {logfloat: [1.0e-5, 1.0e-3]}
profiles:
  quick: {data.source: mnist, data.path: null, training.steps: 400, teacher.steps: 50}
"""


def test_a_profile_replacing_a_file_setting_is_said_by_validate_and_dry_run(tmp_path):
    """The profile's data.source replaces the file's npz: said, in one line; its
    training.steps equals the file's and teacher.steps was never set there: not said; a
    --set of the same key is the user's own choice: not said either."""
    study = tmp_path / "replaced.yaml"
    study.write_text(PROFILE_STUDY % (tmp_path / "mine.npz"))
    spec = load_study(study, profile="quick")
    assert spec.profile_replaced == (
        ("data.path", str(tmp_path / "mine.npz"), None),
        ("data.source", "npz", "mnist"),
    )
    assert load_study(study, profile="none").profile_replaced == ()
    assert (
        load_study(
            study, profile="quick", overrides=["data.source=mnist", "data.path=null"]
        ).profile_notes()
        == []
    )

    note = "note: profile 'quick' replaces 2 values of settings: data.path "
    result = CliRunner().invoke(app, ["validate", str(study)])
    assert result.exit_code == 0, result.output
    assert note in result.output and "'npz' -> 'mnist'" in result.output
    assert "checked: the file, the data" in result.output
    dry = CliRunner().invoke(app, [str(study), "--dry-run"], catch_exceptions=False)
    assert dry.exit_code == 0 and note in dry.output


def test_validate_runs_the_preflight_and_creates_no_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ok = CliRunner().invoke(app, ["validate", LRM_STUDY])
    assert ok.exit_code == 0 and ok.output.splitlines()[-1].startswith("ok: study 'lrm_rank'")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no mlflow.db, no optuna.db
    result = CliRunner().invoke(app, ["validate", LRM_STUDY, "--set", "data.root=/nope"])
    assert result.exit_code == 2
    assert "data.root='/nope' is invalid: no such folder" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []
