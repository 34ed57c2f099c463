"""The FP reference run: its key, its reuse, and how the analysis keeps it apart from trials.

Real components, no Ray: sqlite MLflow stores, a saved diffusers UNet as teacher and
the offline MNIST copy. The evaluation itself (a Ray task) is covered by the study
tests in test_study_run.py.
"""

from __future__ import annotations

import dataclasses
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from rich.console import Console

from binarydm._typed import ConfigError
from binarydm.search._analysis import FID_RATIO, pareto_table, summarize
from binarydm.search._pareto import default_reference_point, hypervolume, pareto_front
from binarydm.search._reference import (
    TAG_FP_REFERENCE,
    evaluation_data_sha256,
    per_trial_keys,
    reference_identity,
    reference_key,
    start_reference,
)
from binarydm.spec import parse_study
from binarydm.tracking import StudyTracker, load_reference, load_study_results
from binarydm.train.settings import EvalSettings, TrialSettings

TEACHER = "a" * 64
DATA = "b" * 64
OBJECTIVES = [("fid", "minimize"), ("ops_g", "minimize")]
# One valid change of every evaluation field from TrialSettings' defaults.
EVALUATION_CHANGES = {
    "fid_samples": 999,
    "fid_dims": 64,
    "sampling_steps": 50,
    "sample_batch_size": 100,
    "reference_split": "train",
    "test_loss_images": 256,
    "grid_images": 16,
    "use_ema": False,
    "precision_recall_k": 5,
    "sample_compile": "default",
    "fid_batch_size": 50,
}


def test_every_evaluation_field_has_a_change_here() -> None:
    # A new evaluation field must be added above, so that the key test covers it.
    assert set(EVALUATION_CHANGES) == {f.name for f in dataclasses.fields(EvalSettings)}


def test_reference_key_changes_with_what_the_fp_scores_depend_on() -> None:
    base = TrialSettings()
    key = reference_key(base, TEACHER, DATA)
    assert key == reference_key(TrialSettings(), TEACHER, DATA)  # deterministic
    assert len(key) == 64 and int(key, 16) >= 0
    changed = {
        f"evaluation.{name}": reference_key(
            base.replace(**{f"evaluation.{name}": value}), TEACHER, DATA
        )
        for name, value in EVALUATION_CHANGES.items()
    }
    changed["teacher"] = reference_key(base, "c" * 64, DATA)
    changed["data sha"] = reference_key(base, TEACHER, "d" * 64)
    changed["seed"] = reference_key(base.replace(seed=1), TEACHER, DATA)
    changed["device"] = reference_key(base.replace(**{"workers.use_gpu": True}), TEACHER, DATA)
    changed["timesteps"] = reference_key(
        base.replace(**{"training.num_train_timesteps": 500}), TEACHER, DATA
    )
    changed["resolution"] = reference_key(base.replace(**{"data.resolution": 32}), TEACHER, DATA)
    changed["channels"] = reference_key(base.replace(**{"data.channels": 3}), TEACHER, DATA)
    assert key not in changed.values()
    assert len(set(changed.values())) == len(changed)  # every change its own key


def test_reference_key_ignores_what_only_trials_depend_on() -> None:
    base = TrialSettings()
    key = reference_key(base, TEACHER, DATA)
    for dotted, value in {
        "training.lr": 3e-4,
        "training.steps": 100,
        "method.lrm.weight": 0.5,
        "teacher.steps": 10,  # shapes the teacher, whose sha256 is in the key already
        "data.train_limit": 1000,  # evaluate() never reads the training subset
        "workers.cpus_per_worker": 2,
        "workers.inline": True,
    }.items():
        assert reference_key(base.replace(**{dotted: value}), TEACHER, DATA) == key, dotted
    identity = reference_identity(base, TEACHER, DATA)
    assert identity["device"] == "cpu" and identity["seed"] == 0
    assert identity["evaluation"] == dataclasses.asdict(base.evaluation)


def test_evaluation_data_sha256_is_of_the_images_evaluate_reads(shared_data, tmp_path) -> None:
    settings = TrialSettings().replace(
        **{"evaluation.fid_samples": 100, "evaluation.fid_dims": 64,
           "evaluation.test_loss_images": 32}
    )  # fmt: skip
    cache = str(tmp_path / "cache")
    digest = evaluation_data_sha256(settings, str(shared_data), cache)
    assert digest == evaluation_data_sha256(settings, str(shared_data), cache)
    more = settings.replace(**{"evaluation.test_loss_images": 33})
    assert evaluation_data_sha256(more, str(shared_data), cache) != digest
    limited = settings.replace(**{"data.train_limit": 500})
    assert evaluation_data_sha256(limited, str(shared_data), cache) == digest


def _spec(tmp_path: Path, name: str = "fp_study", space=None, search=None, **settings):
    data = {
        "name": name,
        "settings": {
            "evaluation": {"fid_samples": 100, "fid_dims": 64, "test_loss_images": 32},
            **settings,
        },
        "search": {
            "algorithm": "random",
            "trials": 2,
            "objectives": [{"metric": m} for m, _ in OBJECTIVES],
            "space": space or {"method.lrm.weight": {"logfloat": [1e-4, 1.0]}},
            **(search or {}),
        },
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    return parse_study(data).resolve_paths(tmp_path)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> str:
    from bdm_support import small_unet

    folder = tmp_path_factory.mktemp("teacher") / "unet"
    small_unet(channels=1).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def template_db(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()  # the schema migrations, once
    return path


@pytest.fixture
def workdir(template_db, tmp_path, shared_data, monkeypatch) -> Path:
    shutil.copy(template_db, tmp_path / "mlflow.db")
    monkeypatch.setenv("BINARYDM_DATA_ROOT", str(shared_data))
    return tmp_path


def _tracker(spec) -> StudyTracker:
    return StudyTracker.for_study(spec)


def _finished_reference(tracker: StudyTracker, key: str, fid: float, ops: float) -> str:
    run_id = tracker.create_reference_run(key)
    tracker.log_params(run_id, {"fid_samples": 100, "seed": 0})
    tracker.log_metrics(run_id, {"fid": fid, "ops_g": ops, "test_loss": 0.05})
    tracker.client.set_terminated(run_id, "FINISHED")
    return run_id


def _trials(tracker: StudyTracker, results: dict[int, tuple[float, float] | None]) -> None:
    for trial_id, values in results.items():
        run_id, _ = tracker.start_attempt(trial_id)
        if values is None:
            tracker.finish_trial(run_id, "FAILED", error="diverged")
            continue
        tracker.log_metrics(run_id, {"fid": values[0], "ops_g": values[1]})
        tracker.finish_trial(run_id, "FINISHED")


def test_summary_keeps_the_reference_out_of_the_front_and_logs_ratios(workdir) -> None:
    spec = _spec(workdir)
    tracker = _tracker(spec)
    _trials(tracker, {0: (40.0, 1.0), 1: (30.0, 2.0), 2: (60.0, 2.5), 3: None})
    # The FP model dominates every trial in FID and would move the reference point in ops.
    fp_run = _finished_reference(tracker, "k" * 64, fid=10.0, ops=20.0)

    summary = summarize(tracker, OBJECTIVES)
    points = np.array([[40.0, 1.0], [30.0, 2.0], [60.0, 2.5]])
    directions = [d for _, d in OBJECTIVES]
    ref = default_reference_point(points, directions)
    corner = dict(zip(["fid", "ops_g"], ref, strict=True))
    assert summary["reference_point"] == pytest.approx(corner)
    mask = pareto_front(points, directions)
    assert summary["hypervolume"] == pytest.approx(hypervolume(points[mask], ref, directions))
    assert summary["pareto_ids"] == [0, 1] and summary["counts"] == {"FINISHED": 3, "FAILED": 1}
    assert summary["reference"]["run_id"] == fp_run
    assert "pareto" not in tracker.client.get_run(fp_run).data.tags

    client = tracker.client
    loaded = load_study_results(spec.name, spec.name, spec.tracking.uri)
    records = {r["trial_id"]: r for r in loaded}
    for trial_id, fid in {0: 40.0, 1: 30.0, 2: 60.0}.items():
        assert records[trial_id]["metrics"][FID_RATIO] == pytest.approx(fid / 10.0, abs=1e-9)
    assert FID_RATIO not in records[3]["metrics"]  # failed: no ratio

    summarize(tracker, OBJECTIVES)  # bdm-search pareto, a resume: nothing logged twice
    history = client.get_metric_history(records[0]["run_id"], FID_RATIO)
    assert len(history) == 1

    out = io.StringIO()
    Console(file=out, width=200).print(pareto_table(summary))
    table = out.getvalue()
    assert FID_RATIO in table and "FP" in table and fp_run[:12] in table
    assert "not in the front" in table
    fp_line = next(line for line in table.splitlines() if fp_run[:12] in line)
    assert "10" in fp_line and "20" in fp_line and "1" in fp_line

    parent = tracker.parent_run_id()
    html = Path(client.download_artifacts(parent, "pareto.html", str(workdir))).read_text()
    assert "FP teacher (reference)" in html


def test_a_failed_reference_gives_no_ratio_and_no_fp_row(workdir) -> None:
    spec = _spec(workdir)
    tracker = _tracker(spec)
    _trials(tracker, {0: (40.0, 1.0)})
    run_id = tracker.create_reference_run("k" * 64)
    tracker.client.set_terminated(run_id, "FAILED")
    summary = summarize(tracker, OBJECTIVES)
    assert summary["reference"] is None
    assert load_reference(spec.name, spec.name, spec.tracking.uri)["status"] == "FAILED"
    record = load_study_results(spec.name, spec.name, spec.tracking.uri)[0]
    assert FID_RATIO not in record["metrics"]
    out = io.StringIO()
    Console(file=out, width=200).print(pareto_table(summary))
    assert FID_RATIO not in out.getvalue() and "FP" not in out.getvalue()


def test_start_reference_keeps_a_finished_one_and_reuses_across_experiments(
    workdir, teacher_dir
) -> None:
    from binarydm.models import weights_sha256

    spec = _spec(workdir)
    settings = spec.trial_settings({}, 0)
    data = evaluation_data_sha256(settings, settings.data.root, str(workdir / "cache"))
    key = reference_key(settings, weights_sha256(teacher_dir), data)
    tracker = _tracker(spec)
    stale = _finished_reference(tracker, "0" * 64, fid=99.0, ops=1.0)  # another key: replaced
    other = _spec(workdir, name="earlier_study")
    source = _finished_reference(_tracker(other), key, fid=12.5, ops=3.0)

    assert start_reference(spec, tracker, teacher_dir, str(workdir / "cache")) is None
    (run,) = tracker.reference_runs()
    assert run.info.status == "FINISHED" and run.info.run_name == "fp-reference"
    tags = run.data.tags
    assert tags["reused_from"] == source and tags["reference_key"] == key
    assert tags["mlflow.parentRunId"] == tracker.parent_run_id() and tags["study"] == spec.name
    assert run.data.metrics["fid"] == 12.5 and run.data.params["fid_samples"] == "100"
    assert run.data.params["teacher.sha256"] == weights_sha256(teacher_dir)
    # Each value once, under the comparability name design.md gives it.
    assert run.data.params["sampling_steps"] == str(settings.evaluation.sampling_steps)
    assert "evaluation.sampling_steps" not in run.data.params
    replaced = tracker.client.get_run(stale).data.tags
    assert replaced["bdm.role"] == "reference-replaced"
    assert replaced["replaced_by"] == run.info.run_id
    parent_tags = tracker.client.get_run(tracker.parent_run_id()).data.tags
    assert parent_tags[TAG_FP_REFERENCE] == run.info.run_id

    # Called again (a resume): the finished run of the key stays, nothing new is made.
    assert start_reference(spec, tracker, teacher_dir, str(workdir / "cache")) is None
    assert [r.info.run_id for r in tracker.reference_runs()] == [run.info.run_id]
    assert load_reference(spec.name, spec.name, spec.tracking.uri)["run_id"] == run.info.run_id


def test_no_reference_when_the_space_changes_what_it_would_be_scored_on(workdir) -> None:
    spec = _spec(workdir, space={"evaluation.sampling_steps": {"choice": [4, 8]}})
    assert per_trial_keys(spec) == ["evaluation.sampling_steps"]
    tracker = _tracker(spec)
    assert start_reference(spec, tracker, "/no/teacher", str(workdir / "cache")) is None
    assert tracker.reference_runs() == []
    note = tracker.client.get_run(tracker.parent_run_id()).data.tags[TAG_FP_REFERENCE]
    assert note.startswith("none: the space searches evaluation.sampling_steps")


def test_no_reference_when_the_study_file_turns_it_off(workdir, teacher_dir) -> None:
    spec = _spec(workdir, name="smoke", search={"fp_reference": False})
    tracker = _tracker(spec)
    assert start_reference(spec, tracker, teacher_dir, str(workdir / "cache")) is None
    assert tracker.reference_runs() == []
    note = tracker.client.get_run(tracker.parent_run_id()).data.tags[TAG_FP_REFERENCE]
    assert note == "none: search.fp_reference is false"
    with pytest.raises(ConfigError, match=r"search.fp_reference"):
        _spec(workdir, search={"fp_reference": "yes"})
