"""Bad input fails at once, in one line, with exit code 2 and nothing written; secrets in a
storage URL never reach MLflow.

Unknown keys, wrong types, out-of-range values and tracking URIs of an unknown scheme are
covered by tests/search/test_study_run.py::test_bad_input_is_one_line_and_writes_nothing;
here are the inputs that only fail when something is opened: data, teacher, Optuna
storage, MLflow server, Ray address.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path

import pytest
from fault_support import BDM_SEARCH, LRM_STUDY, free_port, tiny
from typer.testing import CliRunner

from binarydm.cli import app
from binarydm.search._console import mask_secrets
from binarydm.search._driver import _study_file_text
from binarydm.search._preflight import check_mlflow_schema
from binarydm.spec import load_study

SECRET = "S3cr3tPassw0rd"
SECRET_URL = f"postgresql://bdm:{SECRET}@127.0.0.1:1/optuna"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--set", "data.source=npz", "--set", "data.path=/nope.npz"],
            "data.path='/nope.npz' is invalid: npz: /nope.npz not found",
        ),
        (
            ["--set", "teacher.pretrained=/nope"],
            "teacher.pretrained='/nope' is invalid: no such folder",
        ),
        (
            ["--set", f"storage.optuna={SECRET_URL}"],
            "storage.optuna='postgresql://bdm:***@127.0.0.1:1/optuna' cannot be opened",
        ),
    ],
    ids=["missing-data-path", "unreadable-teacher", "unreachable-optuna-storage"],
)
def test_what_fails_on_open_fails_before_ray_in_one_line(
    args, message, workspace, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    started = time.monotonic()
    result = CliRunner().invoke(app, [LRM_STUDY, *args])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output
    assert SECRET not in result.output
    assert list(tmp_path.iterdir()) == []  # no MLflow, Optuna or Ray files
    assert time.monotonic() - started < 60


def test_silent_ray_address_is_one_line_within_bounded_time(workspace, tmp_path):
    started = time.monotonic()
    done = subprocess.run(
        [BDM_SEARCH, LRM_STUDY, "--address", f"127.0.0.1:{free_port()}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode == 2
    assert len(lines) == 1 and "does not answer" in lines[0], lines
    assert elapsed < 40, f"took {elapsed:.1f} s"
    assert list(tmp_path.iterdir()) == []
    print(f"\nTIMING silent --address: refused in {elapsed:.1f} s")


def test_local_ray_that_cannot_start_is_one_line(workspace, tmp_path):
    # A real start failure: RAY_TMPDIR names a file, so Ray cannot make its session folder.
    # (The one seen on an overloaded machine, "The current node timed out during startup",
    # comes through the same handler.)
    not_a_folder = tmp_path / "ray-tmp"
    not_a_folder.write_text("")
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "RAY_TMPDIR": str(not_a_folder)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [BDM_SEARCH, LRM_STUDY], cwd=work, env=env, capture_output=True, text=True, timeout=180
    )
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode == 2, lines
    assert len(lines) == 1, lines
    assert "the local Ray cluster could not start (NotADirectoryError" in lines[0]
    assert f"RAY_TMPDIR ({not_a_folder})" in lines[0] and "--verbose" in lines[0]
    # Only the Optuna storage, opened (empty) before Ray to fail fast on a bad URL.
    assert sorted(p.name for p in work.iterdir()) == ["optuna.db"]


def test_storage_password_never_reaches_mlflow(tiny_teacher, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["trial", LRM_STUDY, *tiny(steps=10, every=5, inline=True),
            "--set", f"storage.optuna={SECRET_URL}"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert SECRET not in result.output
    store = tmp_path / "mlflow.db"
    artifacts = [p for p in (tmp_path / "mlartifacts").rglob("*") if p.is_file()]
    assert {p.name for p in artifacts} >= {"config.json", "samples.png"}
    # The raw bytes of the tracking store (params, tags, metrics) and of every artifact.
    for path in [store, *artifacts]:
        assert SECRET.encode() not in path.read_bytes(), path


def test_study_file_logged_on_the_parent_run_has_passwords_masked(tmp_path):
    text = (
        Path(LRM_STUDY)
        .read_text()
        .replace("search:\n", f"storage:\n  optuna: {SECRET_URL}\n\nsearch:\n", 1)
    )
    study = tmp_path / "with_secret.yaml"
    study.write_text(text)
    spec = load_study(study)
    assert spec.storage.optuna == SECRET_URL
    logged = _study_file_text(spec)
    assert SECRET not in logged and "postgresql://bdm:***@127.0.0.1:1/optuna" in logged
    assert mask_secrets("mysql+pymysql://u:p%40ss@db:3306/x") == "mysql+pymysql://u:***@db:3306/x"
    assert mask_secrets("sqlite:////tmp/optuna.db") == "sqlite:////tmp/optuna.db"


def test_store_of_a_newer_mlflow_is_one_line_and_left_as_it_is(workspace, tmp_path, monkeypatch):
    # A real store, its schema revision then set to one this MLflow's migrations lack: what a
    # GPU machine's newer MLflow writes (MLflow's own error says to run `mlflow db upgrade`,
    # which cannot read it either).
    import hashlib
    import sqlite3

    import mlflow

    database = tmp_path / "mlflow.db"
    uri = f"sqlite:///{database}"
    mlflow.MlflowClient(uri).create_experiment("lrm_rank")
    with contextlib.closing(sqlite3.connect(database)) as db, db:
        db.execute("update alembic_version set version_num = 'ffffffffffff'")
    before = hashlib.sha256(database.read_bytes()).hexdigest()
    monkeypatch.chdir(tmp_path)
    for args in (["pareto", "lrm_rank", "--tracking-uri", uri], [LRM_STUDY, "--resume"]):
        result = CliRunner().invoke(app, args)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2, result.output
        assert len(lines) == 1, result.output
        assert f"the MLflow store {database} was written by a newer MLflow" in lines[0]
        assert "schema revision ffffffffffff" in lines[0] and mlflow.__version__ in lines[0]
    assert hashlib.sha256(database.read_bytes()).hexdigest() == before
    assert [p.name for p in tmp_path.iterdir()] == ["mlflow.db"]  # no Optuna, Ray files
    # An Optuna database has an alembic_version table of its own: not taken for a store
    # of a newer MLflow (MLflow reports what it is).
    import optuna

    other = tmp_path / "other"
    other.mkdir()
    optuna.create_study(storage=f"sqlite:///{other / 'optuna.db'}", study_name="s")
    check_mlflow_schema(f"sqlite:///{other / 'optuna.db'}")
