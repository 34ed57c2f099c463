"""A finished study exported to a folder (runs.json + small artifacts) and imported back.

Real components: the CLI, the session's finished two-trial study (its sqlite MLflow
store, tests/conftest.finished_study) and a second sqlite store the archive is imported into.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from binarydm.cli import app
from binarydm.tracking._archive import RUNS_FILE, TAG_ARCHIVED_RUN_ID, read_archive


@pytest.fixture(scope="module")
def study_store(finished_study):
    workdir, _ = finished_study
    return workdir, f"sqlite:///{workdir / 'mlflow.db'}"


@pytest.fixture(scope="module")
def archive(study_store, tmp_path_factory):
    _, uri = study_store
    out = tmp_path_factory.mktemp("archive") / "lrm_rank"
    result = CliRunner().invoke(
        app, ["export", "lrm_rank", "--out", str(out), "--tracking-uri", uri]
    )
    assert result.exit_code == 0, result.output
    return out, result.output


def _by_name(client: MlflowClient, experiment: str) -> dict[str, object]:
    found = client.get_experiment_by_name(experiment)
    return {r.info.run_name: r for r in client.search_runs([found.experiment_id])}


def test_export_writes_every_run_and_no_weights(study_store, archive):
    _, uri = study_store
    out, output = archive
    document = read_archive(out)
    roles = sorted(r["tags"].get("bdm.role") for r in document["runs"])
    assert roles == ["parent", "reference", "trial", "trial"]
    assert not [p for p in out.rglob("*") if p.suffix in (".bdm", ".pt", ".safetensors")]
    # The Pareto trials' packed models were logged, and are reported as left out.
    assert "checkpoint/model.bdm" in output and document["skipped_artifacts"]
    client = MlflowClient(uri)
    for record in document["runs"]:
        run = client.get_run(record["run_id"])
        assert record["params"] == run.data.params and record["metrics"] == run.data.metrics
        for path in record["artifacts"]:
            assert (out / "artifacts" / record["run_id"] / path).is_file()
    trial = next(r for r in document["runs"] if r["tags"].get("bdm.role") == "trial")
    assert {"samples.png", "config.json"} <= set(trial["artifacts"])
    assert sorted({p[0] for p in trial["metric_history"]["loss"]}) == [5, 10]  # the curve
    json.loads((out / RUNS_FILE).read_text())  # plain JSON, nothing else


def test_import_recreates_the_runs_for_the_ui_and_pareto(study_store, archive, tmp_path):
    _, uri = study_store
    out, _ = archive
    target = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = CliRunner().invoke(app, ["import", str(out), "--tracking-uri", target])
    assert result.exit_code == 0, result.output
    source, copy = MlflowClient(uri), MlflowClient(target)
    old, new = _by_name(source, "lrm_rank"), _by_name(copy, "lrm_rank")
    assert set(old) == set(new) and len(new) == 4
    new_ids = {r.data.tags[TAG_ARCHIVED_RUN_ID]: r.info.run_id for r in new.values()}
    for name, before in old.items():
        after = new[name]
        assert after.info.run_id != before.info.run_id
        assert after.info.status == before.info.status
        assert after.data.params == before.data.params
        assert after.data.metrics == before.data.metrics
        tags = {k: v for k, v in before.data.tags.items() if k != "mlflow.parentRunId"}
        assert tags.items() <= after.data.tags.items()
        if "mlflow.parentRunId" in before.data.tags:  # linked to the imported parent
            assert (
                after.data.tags["mlflow.parentRunId"]
                == new_ids[before.data.tags["mlflow.parentRunId"]]
            )
        for key in before.data.metrics:
            steps = [(m.step, m.value) for m in source.get_metric_history(before.info.run_id, key)]
            again = [(m.step, m.value) for m in copy.get_metric_history(after.info.run_id, key)]
            assert sorted(steps) == sorted(again), key
    trial = next(r for r in new.values() if r.data.tags.get("bdm.role") == "trial")
    grid = Path(copy.download_artifacts(trial.info.run_id, "samples.png", str(tmp_path)))
    original = out / "artifacts" / trial.data.tags[TAG_ARCHIVED_RUN_ID] / "samples.png"
    assert grid.read_bytes() == original.read_bytes()

    result = CliRunner().invoke(app, ["pareto", "lrm_rank", "--tracking-uri", target])
    assert result.exit_code == 0, result.output
    assert "Pareto front" in result.output and "│ FP " in result.output

    again = CliRunner().invoke(app, ["import", str(out), "--tracking-uri", target])
    assert again.exit_code == 2 and "exists" in again.output
    assert len(_by_name(copy, "lrm_rank")) == 4  # nothing imported twice


def test_the_optuna_study_travels_with_the_archive_linked_to_the_new_runs(study_store, tmp_path):
    # What `--resume` on another machine needs: the sampler's history with its numbers,
    # params, distributions, states and values, each trial naming its run in the new store.
    import optuna

    workdir, uri = study_store
    source = f"sqlite:///{workdir / 'optuna.db'}"
    out = tmp_path / "archive"
    args = ["export", "lrm_rank", "--out", str(out), "--tracking-uri", uri]
    result = CliRunner().invoke(app, [*args, "--optuna-storage", source])
    assert result.exit_code == 0 and "Optuna study's 2 trials" in result.output, result.output
    assert sorted(p.name for p in out.iterdir()) == ["artifacts", "optuna.jsonl", RUNS_FILE]
    target, storage = f"sqlite:///{tmp_path / 'mlflow.db'}", f"sqlite:///{tmp_path / 'o.db'}"
    args = ["import", str(out), "--tracking-uri", target, "--optuna-storage", storage]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0 and "resume with --resume" in result.output, result.output

    before = optuna.load_study(study_name="lrm_rank", storage=source)
    after = optuna.load_study(study_name="lrm_rank", storage=storage)
    assert after.directions == before.directions and after.metric_names == before.metric_names
    assert len(after.trials) == 2
    runs = {r.data.tags["trial_id"]: r for r in _by_name(MlflowClient(target), "lrm_rank").values()
            if r.data.tags.get("bdm.role") == "trial"}  # fmt: skip
    for old, new in zip(before.trials, after.trials, strict=True):
        assert (new.number, new.state, new.values) == (old.number, old.state, old.values)
        assert new.params == old.params and new.distributions == old.distributions
        run = runs[str(new.number)]
        assert new.user_attrs["mlflow_run_id"] == run.info.run_id
        assert run.data.tags[TAG_ARCHIVED_RUN_ID] == old.user_attrs["mlflow_run_id"]
        rest = {k: v for k, v in new.user_attrs.items() if k != "mlflow_run_id"}
        assert rest.items() <= old.user_attrs.items()

    # A second import is refused on the Optuna study too, before any MLflow run is made.
    other = f"sqlite:///{tmp_path / 'other.db'}"
    args = ["import", str(out), "--tracking-uri", other, "--optuna-storage", storage]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "Optuna study 'lrm_rank' exists" in result.output
    assert MlflowClient(other).get_experiment_by_name("lrm_rank") is None


def test_a_finished_study_from_its_archive_grows_by_a_raised_trial_budget(
    study_store, tmp_path, monkeypatch
):
    # A search spread over sessions, each ending with the stores exported and its trials
    # finished (a session's budget lowered to what it can finish): the next session imports
    # the archive and resumes with the full budget. Only the missing trial runs, under
    # the same parent run, in the same Optuna study (its three trials, numbered on).
    import optuna
    from bdm_support import LRM_STUDY, TINY_STUDY

    workdir, uri = study_store
    out = tmp_path / "archive"
    args = ["export", "lrm_rank", "--out", str(out), "--tracking-uri", uri, "--optuna-storage"]
    result = CliRunner().invoke(app, [*args, f"sqlite:///{workdir / 'optuna.db'}"])
    assert result.exit_code == 0, result.output
    machine = tmp_path / "next"
    machine.mkdir()
    target, storage = f"sqlite:///{machine / 'mlflow.db'}", f"sqlite:///{machine / 'optuna.db'}"
    args = ["import", str(out), "--tracking-uri", target, "--optuna-storage", storage]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    imported = _by_name(MlflowClient(target), "lrm_rank")
    assert imported["lrm_rank"].info.status == "FINISHED"

    monkeypatch.chdir(machine)  # the stores' default paths: <cwd>/mlflow.db, optuna.db
    result = CliRunner().invoke(app, [LRM_STUDY, *TINY_STUDY, "--trials", "3", "--resume"])
    assert result.exit_code == 0, result.output
    trials = optuna.load_study(study_name="lrm_rank", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    runs = _by_name(MlflowClient(target), "lrm_rank")
    assert sorted(runs) == sorted([*imported, "trial-0002"])  # the FP reference: kept
    for name, run in imported.items():  # no second parent; nothing imported run again
        assert runs[name].info.run_id == run.info.run_id and runs[name].info.status == "FINISHED"
    for name in ("trial-0000", "trial-0001"):
        assert runs[name].data.tags["attempt"] == "1"
    parent = runs["lrm_rank"]
    new = runs["trial-0002"]
    assert new.info.status == "FINISHED" and TAG_ARCHIVED_RUN_ID not in new.data.tags
    assert new.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert trials[2].values[0] == pytest.approx(new.data.metrics["fid"])
    assert {"pareto"} <= set(new.data.tags)


def test_bad_archives_are_one_line_errors(tmp_path):
    target = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = CliRunner().invoke(app, ["import", str(tmp_path / "nope"), "--tracking-uri", target])
    assert result.exit_code == 2 and "not a run archive" in result.output
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / RUNS_FILE).write_text(json.dumps({"format": "other", "version": 9}))
    result = CliRunner().invoke(app, ["import", str(tmp_path / "bad"), "--tracking-uri", target])
    assert result.exit_code == 2 and "version 9" in result.output
    (tmp_path / "no_study").mkdir()
    (tmp_path / "no_study" / RUNS_FILE).write_text(
        json.dumps({"format": "binarydm-runs", "version": 1, "experiment": {"name": "e"}})
    )
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    args = ["import", str(tmp_path / "no_study"), "--tracking-uri", target]
    result = CliRunner().invoke(app, [*args, "--optuna-storage", storage])
    assert result.exit_code == 2 and "holds no Optuna study" in result.output


def test_export_refuses_a_folder_that_holds_an_archive(study_store, archive):
    _, uri = study_store
    out, _ = archive
    result = CliRunner().invoke(
        app, ["export", "lrm_rank", "--out", str(out), "--tracking-uri", uri]
    )
    assert result.exit_code == 2 and "exists" in result.output
    result = CliRunner().invoke(
        app, ["export", "nope", "--out", str(out.parent / "x"), "--tracking-uri", uri]
    )
    assert result.exit_code == 2 and "no active MLflow experiment" in result.output


def test_sample_reads_the_logged_packed_model_where_the_checkpoint_is_absent(study_store, tmp_path):
    """As on a machine that has the study's MLflow store but not its Ray results."""
    _, uri = study_store
    source = MlflowClient(uri)
    pareto = next(
        r for r in _by_name(source, "lrm_rank").values() if r.data.tags.get("pareto") == "true"
    )
    packed = Path(
        source.download_artifacts(pareto.info.run_id, "checkpoint/model.bdm", str(tmp_path))
    )
    elsewhere = f"sqlite:///{tmp_path / 'other.db'}"
    client = MlflowClient(elsewhere)
    experiment = client.create_experiment("moved", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(experiment, tags={"checkpoint": str(tmp_path / "gone")}).info.run_id
    client.log_artifact(run, str(packed), "checkpoint")
    out = tmp_path / "grid.png"
    args = [
        "sample",
        run,
        "--tracking-uri",
        elsewhere,
        "--out",
        str(out),
        "--num",
        "4",
        "--steps",
        "3",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    bare = client.create_run(experiment, tags={"checkpoint": str(tmp_path / "gone")}).info.run_id
    result = CliRunner().invoke(app, ["sample", bare, "--tracking-uri", elsewhere])
    assert result.exit_code == 2 and "has no packed model" in result.output
