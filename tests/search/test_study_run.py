"""A real study through the CLI: local Ray, sqlite MLflow and Optuna, real MNIST images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from bdm_support import LRM_STUDY, TINY_STUDY
from typer.testing import CliRunner

from binarydm import metric_contract
from binarydm.cli import app

# The session's finished study (tests/conftest.finished_study) ran with these.
TINY = TINY_STUDY


def _runs(workdir: Path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("lrm_rank")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("bdm.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("bdm.role") == "trial"]
    return client, parents, children


def test_parent_and_child_runs_with_contract_metrics(finished_study):
    workdir, output = finished_study
    client, parents, children = _runs(workdir)
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert {c.data.tags["trial_id"] for c in children} == {"0", "1"}
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["study"] == "lrm_rank" and child.data.tags["attempt"] == "1"
        assert child.data.tags["profile"] == "quick"
        assert child.data.tags["pareto"] in ("true", "false")
        for metric in ("fid", "ops_g", "bops_g", "flops_g", "size_mib", "test_loss",
                       "ops_saving", "size_saving", "train_s", "eval_s", "timing/setup_s",
                       "timing/sample_s", "timing/fid_s", "timing/fit_s", "timing/prepare_s",
                       "timing/ray_start_s", "timing/ray_stop_s", "timing/sample_compile_s",
                       "timing/fid_features_s"):  # fmt: skip
            assert metric in child.data.metrics, metric
        m = child.data.metrics
        # The quick profile samples eagerly; the samples' Inception pass is part of the FID's.
        assert m["timing/sample_compile_s"] == 0
        assert 0 < m["timing/fid_features_s"] <= m["timing/fid_s"]
        # Every name the run carries is the contract's; the timing ones sort after the rest.
        assert all(metric_contract.is_trial_metric(k) for k in m), sorted(m)
        assert {k for k in m if k.endswith(("_s", "_unix"))} - set(metric_contract.THROUGHPUT) == {
            k for k in m if k.startswith(metric_contract.TIMING_PREFIX)
        }
        # The fit's wall time holds the worker's own set-up, training and evaluation.
        inside = (
            m["timing/ray_start_s"] + m["timing/setup_s"] + m["train_s"] + m["eval_s"]
            + m["timing/ray_stop_s"]
        )  # fmt: skip
        assert m["timing/fit_s"] == pytest.approx(inside, abs=3.0) and m["timing/prepare_s"] > 0
        assert m["timing/ray_start_s"] > 0 and m["timing/ray_stop_s"] > 0
        params = child.data.params
        assert params["fid_dims"] == "64" and params["fid_samples"] == "100"
        assert params["sampling_steps"] == "4" and params["fid_reference"] == "mnist/test/16px"
        assert params["seed"] == "0" and len(params["data.sha256"]) == 64
        assert "method.lrm.rank_divisor" in params and "version.torch" in params
        # Each value once (the comparability names only), the searched ones named.
        assert not {"evaluation.fid_dims", "evaluation.fid_samples"} & set(params)
        assert (
            child.data.tags["searched"]
            == "method.lrm.axis,method.lrm.rank_divisor,method.lrm.weight"
        )
        assert "code.git_commit" in params and "hardware.cpu" in params
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"samples.png", "config.json"} <= artifacts
        curve = client.get_metric_history(child.info.run_id, "loss")
        assert sorted({m.step for m in curve}) == [5, 10]  # live training curve
    pareto = [c for c in children if c.data.tags["pareto"] == "true"]
    assert pareto, "a non-empty study has a non-empty Pareto front"
    for child in pareto:
        assert [a.path for a in client.list_artifacts(child.info.run_id, "checkpoint")] == [
            "checkpoint/model.bdm"
        ]
    parent_artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"pareto.png", "pareto.html", "objectives.json", "study.yaml"} <= parent_artifacts
    assert {"hypervolume_vs_time.png", "hypervolume_history.json"} <= parent_artifacts
    # The trials table: one row per trial with its Pareto tag, and the FP row last.
    import csv

    table = Path(client.download_artifacts(parent.info.run_id, "trials.csv", str(workdir)))
    rows = list(csv.DictReader(table.read_text().splitlines()))
    assert [r["trial"] for r in rows] == ["0", "1", "FP"]
    for child in children:
        (row,) = [r for r in rows if r["run_id"] == child.info.run_id]
        assert row["pareto"] == child.data.tags["pareto"]
        assert float(row["fid"]) == pytest.approx(child.data.metrics["fid"])
        assert row["method.lrm.rank_divisor"] == child.data.params["method.lrm.rank_divisor"]
    assert "trials.html" in parent_artifacts
    assert parent.data.metrics["trials_finished"] == 2
    assert parent.data.metrics["hypervolume"] >= 0
    assert "Pareto front" in output


def test_the_run_prints_where_its_results_are_and_not_rays_banners(finished_study):
    workdir, output = finished_study
    client, parents, _ = _runs(workdir)
    experiment = client.get_experiment(parents[0].info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert f"mlflow ui --backend-store-uri sqlite:///{workdir / 'mlflow.db'}" in output
    page = f"#/experiments/{experiment.experiment_id}?workflowType=machine_learning"
    assert f"http://127.0.0.1:5000/{page}" in output
    for noise in ("Configuration for experiment", "tensorboard", "View detailed results"):
        assert noise not in output
    assert "FP teacher: reusing the cached one in " in output  # the session's tiny teacher
    assert not list(workdir.glob("*.lock"))  # no stray files beside the stores


def test_optuna_storage_holds_complete_trials(finished_study):
    import optuna

    workdir, _ = finished_study
    study = optuna.load_study(study_name="lrm_rank", storage=f"sqlite:///{workdir}/optuna.db")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    _, _, children = _runs(workdir)
    fids = {int(c.data.tags["trial_id"]): c.data.metrics["fid"] for c in children}
    run_ids = {int(c.data.tags["trial_id"]): c.info.run_id for c in children}
    assert study.metric_names == ["fid", "test_loss"]  # optuna-dashboard's axis names
    for trial in study.trials:
        assert trial.user_attrs["mlflow_run_id"] == run_ids[trial.number]
        assert trial.values[0] == pytest.approx(fids[trial.number])  # objectives = fid, test_loss
        assert set(trial.params) == {
            "method.lrm.rank_divisor", "method.lrm.weight", "method.lrm.axis"
        }  # fmt: skip


def test_pareto_and_sample_commands_work_from_mlflow_alone(finished_study, tmp_path):
    workdir, _ = finished_study
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    result = CliRunner().invoke(app, ["pareto", "lrm_rank", "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    assert "Pareto front" in result.output and "│ FP " in result.output  # the FP reference
    _, _, children = _runs(workdir)
    out = tmp_path / "grid.png"
    args = ["sample", children[0].info.run_id, "--tracking-uri", uri, "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--num", "4", "--steps", "3"])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Without --steps: the trial's own sampler (TINY_STUDY scores with 4 DDIM steps).
    result = CliRunner().invoke(app, [*args, "--num", "2"])
    assert result.exit_code == 0, result.output
    assert children[0].data.params["sampling_steps"] == "4"
    trial, run = children[0].data.tags["trial_id"], children[0].info.run_id
    assert (
        f"wrote 2 samples (4 DDIM steps) of trial {trial} of study lrm_rank (run {run[:12]},"
        in (result.output)
    )


def test_rerun_without_resume_is_refused(finished_study, monkeypatch):
    workdir, _ = finished_study
    monkeypatch.chdir(workdir)
    result = CliRunner().invoke(app, [LRM_STUDY, *TINY, "--trials", "2"])
    assert result.exit_code == 2
    assert "--resume" in result.output


def _references(workdir: Path, experiment: str = "lrm_rank"):
    """Every reference run of the experiment, replaced ones included."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id])
    return [r for r in runs if r.data.tags.get("bdm.role", "").startswith("reference")]


def test_trials_log_the_teacher_they_distil_by_its_sha256(finished_study, tiny_teacher):
    from binarydm.models import weights_sha256

    workdir, _ = finished_study
    _, _, children = _runs(workdir)
    for child in children:
        params = child.data.params
        assert params["teacher.sha256"] == weights_sha256(tiny_teacher)
        # Pretrained by the platform: its pretraining settings are what made the weights.
        assert params["teacher.preset"] == "tiny" and params["teacher.steps"] == "40"
        assert params["teacher.pretrained"] == "None"


def test_the_fp_teacher_is_scored_like_the_trials_and_kept_out_of_the_front(finished_study):
    from binarydm.search._pareto import default_reference_point, hypervolume, pareto_front

    workdir, output = finished_study
    client, (parent,), children = _runs(workdir)
    (reference,) = _references(workdir)
    tags, params, metrics = reference.data.tags, reference.data.params, reference.data.metrics
    assert reference.info.status == "FINISHED" and reference.info.run_name == "fp-reference"
    assert tags["bdm.role"] == "reference" and tags["study"] == "lrm_rank"
    assert tags["mlflow.parentRunId"] == parent.info.run_id and len(tags["reference_key"]) == 64
    assert "pareto" not in tags and "reused_from" not in tags and "trial_id" not in tags
    for child in children:  # exactly the trials' evaluation
        for key in ("fid_samples", "fid_dims", "sampling_steps", "fid_reference", "seed",
                    "teacher.sha256"):  # fmt: skip
            assert params[key] == child.data.params[key], key
    assert params["evaluation.sample_batch_size"] == "100" and params["device"] == "cpu"
    for metric in ("fid", "test_loss", "ops_g", "size_mib", "eval_s", "timing/sample_s"):
        assert metrics[metric] > 0, metric
    assert {a.path for a in client.list_artifacts(reference.info.run_id)} == {"samples.png"}
    assert parent.data.tags["fp_reference"] == reference.info.run_id

    for child in children:
        ratio = child.data.metrics["fid_ratio_to_fp"]
        assert ratio == pytest.approx(child.data.metrics["fid"] / metrics["fid"], abs=1e-9)
    # The front, its hypervolume and reference point come from the trials alone.
    objectives = ["fid", "test_loss"]
    points = np.array([[c.data.metrics[m] for m in objectives] for c in children])
    directions = ["minimize", "minimize"]
    corner = default_reference_point(points, directions)
    for metric, value in zip(objectives, corner, strict=True):
        assert float(parent.data.tags[f"reference_point.{metric}"]) == pytest.approx(value)
    front = points[pareto_front(points, directions)]
    expected = hypervolume(front, corner, directions)
    assert parent.data.metrics["hypervolume"] == pytest.approx(expected)
    assert parent.data.metrics["trials_total"] == 2
    assert "│ FP " in output and "fid_ratio_to_fp" in output


def test_a_second_study_with_the_same_teacher_and_settings_reuses_the_reference(
    finished_study, monkeypatch
):
    """Another study (its own experiment) in the same store copies the FP scores."""
    import dataclasses

    from binarydm.data import cache_dir
    from binarydm.search import shared_teacher
    from binarydm.search._reference import start_reference
    from binarydm.spec import load_study
    from binarydm.tracking import StudyTracker, load_reference

    workdir, _ = finished_study
    (original,) = _references(workdir)
    monkeypatch.chdir(workdir)
    spec = load_study(LRM_STUDY, overrides=TINY[1::2])
    spec = dataclasses.replace(spec, name="lrm_rank_again").resolve_paths(workdir)
    tracker = StudyTracker.for_study(spec)
    said: list[str] = []
    teacher = shared_teacher(spec, str(cache_dir(None)), said.append)
    assert said == [f"FP teacher: reusing the cached one in {teacher}"]
    # None: nothing was launched, so nothing is evaluated.
    assert start_reference(spec, tracker, teacher, str(cache_dir(None))) is None
    (copy,) = _references(workdir, "lrm_rank_again")
    assert copy.info.status == "FINISHED" and copy.data.tags["reused_from"] == original.info.run_id
    assert copy.data.tags["reference_key"] == original.data.tags["reference_key"]
    assert copy.data.metrics["fid"] == original.data.metrics["fid"]
    for key in ("fid_samples", "fid_dims", "sampling_steps", "fid_reference", "seed"):
        assert copy.data.params[key] == original.data.params[key]
    assert load_reference("lrm_rank_again", "lrm_rank_again", spec.tracking.uri)["run_id"] == (
        copy.info.run_id
    )
    assert start_reference(spec, tracker, teacher, str(cache_dir(None))) is None  # again: kept
    assert [r.info.run_id for r in _references(workdir, "lrm_rank_again")] == [copy.info.run_id]


def test_a_resumed_study_keeps_its_reference_and_does_not_score_it_again(
    finished_study, monkeypatch
):
    workdir, _ = finished_study
    (before,) = _references(workdir)
    monkeypatch.chdir(workdir)
    result = CliRunner().invoke(app, [LRM_STUDY, *TINY, "--trials", "2", "--resume"])
    assert result.exit_code == 0, result.output
    (after,) = _references(workdir)  # no second reference run, none replaced
    assert after.info.run_id == before.info.run_id and after.info.status == "FINISHED"
    client, _, children = _runs(workdir)
    for metric in ("fid", "eval_s"):  # scored once
        assert len(client.get_metric_history(after.info.run_id, metric)) == 1
    for child in children:  # re-summarised, not re-logged
        assert len(client.get_metric_history(child.info.run_id, "fid_ratio_to_fp")) == 1
    assert "│ FP " in result.output


def test_a_failed_reference_evaluation_leaves_the_study_finished(
    ray_cluster, tiny_teacher, tmp_path, monkeypatch
):
    """The teacher folder is gone between the key and the evaluation (a real load error in
    the Ray task); it is back once the task failed, so the trial distils it as usual."""
    import shutil

    from binarydm.models import weights_sha256
    from binarydm.search import _reference as reference

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    launch = reference.launch_evaluation

    def launch_without_the_teacher(settings, teacher_dir, cache_dir):
        gone = teacher.with_name("teacher-moved")
        teacher.rename(gone)
        task = launch(settings, teacher_dir, cache_dir)
        ray_cluster.wait([task], timeout=300)
        gone.rename(teacher)
        return task

    monkeypatch.setattr(reference, "launch_evaluation", launch_without_the_teacher)
    monkeypatch.chdir(tmp_path)
    # The reference run is the subject: the trial runs inline (no Ray Train fit to wait for).
    args = [LRM_STUDY, *TINY, "--set", f"teacher.pretrained={teacher}", "--trials", "1",
            "--set", "workers.inline=true"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    _, (parent,), (child,) = _runs(tmp_path)
    assert parent.info.status == "FINISHED" and child.info.status == "FINISHED"
    (failed,) = _references(tmp_path)
    assert failed.info.status == "FAILED" and failed.data.tags["bdm.role"] == "reference"
    assert "ModelLoadError" in failed.data.tags["error"]
    assert "fid_ratio_to_fp" not in child.data.metrics and "│ FP " not in result.output
    # A given teacher: its sha256, and no pretraining settings that shaped no weights.
    teacher_params = {k: v for k, v in child.data.params.items() if k.startswith("teacher.")}
    assert teacher_params == {
        "teacher.pretrained": str(teacher),
        "teacher.sha256": weights_sha256(teacher),
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "method.weight.bases=4"], "method.weight.bases=4 is invalid"),
        (["--set", "training.lr=fast"], "training.lr='fast' is invalid"),
        (["--set", "training.nope=1"], "training.nope"),
        (["--set", "evaluation.fid_dims=100"], "evaluation.fid_dims=100 is invalid"),
        (["--tracking-uri", "gopher://x"], "unknown scheme 'gopher'"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [LRM_STUDY, *args])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output
    assert list(tmp_path.iterdir()) == []


def test_missing_study_file_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "nope.yaml" in result.output


def test_dry_run_prints_space_and_cost(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [LRM_STUDY, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "method.lrm.weight" in result.output and "trials: 4" in result.output
    assert list(tmp_path.iterdir()) == []
    json.dumps(result.output)


def test_inline_trials_run_in_their_tune_actor_with_the_same_contract(
    ray_cluster, tiny_teacher, tmp_path, monkeypatch
):
    """``workers.inline``: each trial's loop runs in its Tune trial actor, no Ray Train fit
    around it; the run logs the same metrics, live curve and checkpoints. One at a time,
    so the second trial runs in the first one's actor (``resources.reuse_actors``)."""
    monkeypatch.chdir(tmp_path)
    args = [LRM_STUDY, *TINY, "--set", "workers.inline=true", "--trials", "2"]
    args += ["--set", "resources.max_concurrent_trials=1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    client, parents, children = _runs(tmp_path)
    assert len(parents) == 1 and len(children) == 2
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.params["workers.inline"] == "True"
        m = child.data.metrics
        for metric in ("fid", "size_mib", "test_loss", "timing/setup_s", "train_s", "eval_s"):
            assert m[metric] > 0, metric
        # Nothing between the fit's start and the loop, or after its final report, but the
        # calls themselves: no controller, worker actor or process group (a Ray Train fit
        # takes seconds here, tests above).
        inside = (
            m["timing/ray_start_s"] + m["timing/setup_s"] + m["train_s"] + m["eval_s"]
            + m["timing/ray_stop_s"]
        )  # fmt: skip
        assert m["timing/fit_s"] == pytest.approx(inside, abs=0.5)
        assert 0 <= m["timing/ray_start_s"] < 0.5 and 0 <= m["timing/ray_stop_s"] < 0.5
        # How the trial got going, after the driver handed the study to Tune: the trainable
        # began, then its MLflow run.
        launched = float(parents[0].data.tags["timing/tune_started_unix"])
        entered = m["timing/trial_entered_unix"]
        assert launched <= entered <= child.info.start_time / 1000
        assert 0 < m["timing/run_start_s"] < m["train_s"] + m["eval_s"]
        curve = client.get_metric_history(child.info.run_id, "loss")
        assert sorted({p.step for p in curve}) == [5, 10]
        run_dir = Path(child.data.tags["checkpoint"]).parent
        assert json.loads((run_dir / "checkpoints.json").read_text())[-1] == "checkpoint_final"
    study = __import__("optuna").load_study(
        study_name="lrm_rank", storage=f"sqlite:///{tmp_path}/optuna.db"
    )
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    # Only a fresh actor process stamps its start (which may predate the launch: Ray keeps
    # idle workers); the second trial ran in the first one's process.
    first, second = sorted(children, key=lambda c: c.data.metrics["timing/trial_entered_unix"])
    assert (
        first.data.metrics["timing/actor_created_unix"]
        <= first.data.metrics["timing/trial_entered_unix"]
    )
    assert "timing/actor_created_unix" not in second.data.metrics
