"""The study-description package stands alone: no Ray, Optuna or MLflow; one URI rule."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from binarydm.spec import (
    absolute_store_uri,
    is_remote_uri,
    is_uri,
    load_study,
    sqlite_file,
    uri_scheme,
)
from binarydm.tracking import StudyTracker

REPO = Path(__file__).resolve().parents[2]
RUNNERS = {"ray", "optuna", "mlflow"}

_ISOLATION = """
import sys
import binarydm.spec
assert not {runners} & set(sys.modules), sorted({runners} & set(sys.modules))
spec = binarydm.spec.load_study({study!r}, profile="quick", overrides=["search.trials=2"])
spec = spec.resolve_paths({base!r})
assert spec.search.trials == 2 and spec.tracking.uri.startswith("sqlite:///")
import binarydm.spec.schema
binarydm.spec.schema.study_schema()
loaded = {runners} & set(sys.modules)
assert not loaded, sorted(loaded)
"""


def test_spec_imports_neither_ray_optuna_nor_mlflow(tmp_path):
    code = _ISOLATION.format(
        runners=RUNNERS, study=str(REPO / "search_spaces" / "lrm_rank.yaml"), base=str(tmp_path)
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("text", "scheme"),
    [
        ("sqlite:///mlflow.db", "sqlite"),
        ("sqlite://", "sqlite"),
        ("postgresql+psycopg2://u:p@host/db", "postgresql+psycopg2"),
        ("http://127.0.0.1:5000", "http"),
        ("mlflow-artifacts:/0/abc", "mlflow-artifacts"),
        ("s3://bucket/prefix", "s3"),
        ("ray://head:10001", "ray"),
        ("file:///tmp/mlruns", "file"),
        ("C:/data", None),
        ("localhost:6379", None),
        ("127.0.0.1:6379", None),
        ("relative/dir", None),
        ("/abs/dir", None),
        ("databricks", None),
    ],
)
def test_one_rule_decides_what_is_a_uri(text, scheme):
    assert uri_scheme(text) == scheme
    assert is_uri(text) is (scheme is not None)


def test_remote_uris_exclude_local_stores():
    assert is_remote_uri("postgresql://h/db") and is_remote_uri("http://h:5000")
    assert not is_remote_uri("sqlite:///a.db") and not is_remote_uri("file:///x")
    assert not is_remote_uri("/shared/nfs/mlruns")


def test_store_uris_are_made_absolute(tmp_path):
    assert absolute_store_uri(None, tmp_path, "optuna.db") == f"sqlite:///{tmp_path}/optuna.db"
    assert absolute_store_uri("sqlite:///x.db", tmp_path, "o.db") == f"sqlite:///{tmp_path}/x.db"
    assert absolute_store_uri("sqlite:///:memory:", tmp_path, "o.db") == "sqlite:///:memory:"
    assert absolute_store_uri("postgresql://h/db", tmp_path, "o.db") == "postgresql://h/db"
    assert absolute_store_uri("runs", tmp_path, "o.db") == str(tmp_path / "runs")
    assert sqlite_file(f"sqlite:///{tmp_path}/a.db") == f"{tmp_path}/a.db"
    assert sqlite_file("postgresql://h/db") is None


def test_tracker_is_built_from_the_resolved_study(tmp_path):
    spec = load_study(REPO / "search_spaces" / "lrm_rank.yaml")
    with pytest.raises(ValueError, match="resolve_paths"):
        StudyTracker.for_study(spec)
    resolved = spec.resolve_paths(tmp_path)
    tracker = StudyTracker.for_study(resolved)
    assert (tracker.tracking_uri, tracker.experiment, tracker.study) == (
        resolved.tracking.uri,
        resolved.tracking.experiment,
        resolved.name,
    )
    assert tracker.artifact_location == resolved.tracking.artifact_location
