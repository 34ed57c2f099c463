"""A study's MLflow runs as a plain folder (``runs.json`` + small artifacts), and back.

GPU studies run on a machine whose stores do not stay; their record is committed as
an archive that a CPU machine turns back into MLflow runs for the UI and for
``bdm-search pareto``. The format (version 1, ``docs/run-archive.md``)::

    DIR/runs.json            {"format": "binarydm-runs", "version": 1, "experiment": {...},
                              "runs": [{"run_id", "run_name", "status", "start_time",
                                        "end_time", "params", "tags", "metrics",
                                        "metric_history", "artifacts"}, ...]}
    DIR/artifacts/RUN_ID/... the run's artifacts up to ``max_artifact_bytes`` each
    DIR/optuna.jsonl         optional: the study's Optuna trials (``_study_journal``)

Weights never go in (``*.bdm``, checkpoints): an archive is committed to git. A run's
``metrics`` are its latest values; ``metric_history`` holds every logged point as
``[step, value, timestamp_ms]`` so training curves survive. Importing creates new runs
(MLflow assigns run ids) and rewrites ``mlflow.parentRunId`` to the new parent; the
original id stays in tag ``bdm.archived_run_id``. With an Optuna storage, importing
also recreates the study's Optuna trials, so the study can be resumed there.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from binarydm.tracking._queries import chunks, search_all_runs
from binarydm.tracking._runs import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH
from binarydm.tracking._study_journal import (
    OPTUNA_JOURNAL,
    check_study_absent,
    check_study_present,
    export_study_journal,
    import_study_journal,
    journal_study_name,
)

FORMAT = "binarydm-runs"
VERSION = 1
RUNS_FILE = "runs.json"
ARTIFACTS_DIR = "artifacts"
TAG_ARCHIVED_RUN_ID = "bdm.archived_run_id"
#: Artifacts never archived: model weights (the archive is committed to git).
WEIGHT_SUFFIXES = (".bdm", ".pt", ".pth", ".safetensors", ".ckpt", ".bin")
DEFAULT_MAX_ARTIFACT_BYTES = 2 * 1024 * 1024
# Tags an imported run gets anew: its parent's new id, no model history of the old store.
_SKIPPED_TAGS = (MLFLOW_PARENT_RUN_ID, "mlflow.log-model.history")


def _artifact_files(client: MlflowClient, run_id: str, path: str | None = None) -> list[Any]:
    """(relative path, size in bytes, fetch(target)) of every file the run logged."""
    files = []
    for info in client.list_artifacts(run_id, path):
        if info.is_dir:
            files.extend(_artifact_files(client, run_id, info.path))
            continue

        def fetch(target: Path, artifact: str = info.path) -> None:
            with tempfile.TemporaryDirectory() as tmp:
                shutil.copyfile(client.download_artifacts(run_id, artifact, tmp), target)

        files.append((info.path, info.file_size, fetch))
    return files


def _moved_artifact_files(root: Path) -> list[Any]:
    """The same for a run whose artifact folder was copied here from another machine."""
    return [
        (f.relative_to(root).as_posix(), f.stat().st_size, lambda t, f=f: shutil.copyfile(f, t))
        for f in sorted(root.rglob("*"))
        if f.is_file()
    ]


def _history(client: MlflowClient, run_id: str, key: str) -> list[list[float]]:
    points = client.get_metric_history(run_id, key)
    return [
        [m.step, m.value, m.timestamp] for m in sorted(points, key=lambda m: (m.step, m.timestamp))
    ]


def export_experiment(
    experiment: str,
    out_dir: str | Path,
    tracking_uri: str,
    max_artifact_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES,
    artifact_dir: str | Path | None = None,
    optuna_storage: str | None = None,
    study_name: str | None = None,
) -> dict[str, Any]:
    """Write every active run of ``experiment`` to ``out_dir``; returns what was written.

    ``artifact_dir``: the store's artifact folder (``mlartifacts``) copied from the
    machine that ran the study, whose runs' artifact URIs name paths of that machine;
    a run's files are read from ``artifact_dir/RUN_ID/artifacts``. ``optuna_storage``:
    also write the Optuna study ``study_name`` (default: the experiment's name).
    """
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None or found.lifecycle_stage == "deleted":
        raise LookupError(f"no active MLflow experiment named {experiment!r} at {tracking_uri}")
    out = Path(out_dir)
    if (out / RUNS_FILE).exists():
        raise FileExistsError(f"{out / RUNS_FILE} exists; export into an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    if optuna_storage is not None:  # a missing study fails before any file is written
        check_study_present(optuna_storage, study_name or experiment)
    runs, skipped = [], []
    for run in sorted(
        search_all_runs(client, found.experiment_id, ""), key=lambda r: r.info.start_time
    ):
        run_id = run.info.run_id
        artifacts = []
        moved = Path(artifact_dir) / run_id / "artifacts" if artifact_dir else None
        files = (
            _moved_artifact_files(moved)
            if moved is not None and moved.is_dir()
            else _artifact_files(client, run_id)
        )
        for path, size, fetch in files:
            if path.endswith(WEIGHT_SUFFIXES) or (size is not None and size > max_artifact_bytes):
                skipped.append(f"{run_id}/{path} ({size} bytes)")
                continue
            target = out / ARTIFACTS_DIR / run_id / path
            target.parent.mkdir(parents=True, exist_ok=True)
            fetch(target)
            artifacts.append(path)
        runs.append(
            {
                "run_id": run_id,
                "run_name": run.info.run_name,
                "status": run.info.status,
                "start_time": run.info.start_time,
                "end_time": run.info.end_time,
                "params": dict(sorted(run.data.params.items())),
                "tags": dict(sorted(run.data.tags.items())),
                "metrics": dict(sorted(run.data.metrics.items())),
                "metric_history": {
                    k: _history(client, run_id, k) for k in sorted(run.data.metrics)
                },
                "artifacts": sorted(artifacts),
            }
        )
    document = {
        "format": FORMAT,
        "version": VERSION,
        "experiment": {"name": found.name, "tags": dict(sorted(found.tags.items()))},
        "runs": runs,
        "skipped_artifacts": skipped,
    }
    (out / RUNS_FILE).write_text(json.dumps(document, indent=1, sort_keys=False) + "\n")
    trials = None
    if optuna_storage is not None:
        trials = export_study_journal(optuna_storage, study_name or experiment, out)
    return {
        "runs": len(runs),
        "artifacts": sum(len(r["artifacts"]) for r in runs),
        "skipped": skipped,
        "optuna_trials": trials,
    }


def read_archive(archive_dir: str | Path) -> dict[str, Any]:
    """The parsed ``runs.json`` of an archive, checked for format and version."""
    path = Path(archive_dir) / RUNS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: not a run archive (bdm-search export writes one)"
        )
    document = json.loads(path.read_text())
    if document.get("format") != FORMAT or document.get("version") != VERSION:
        raise ValueError(
            f"{path}: format {document.get('format')!r} version {document.get('version')!r}; "
            f"this binarydm reads {FORMAT!r} version {VERSION}"
        )
    return document


def _log_run(client: MlflowClient, run_id: str, record: dict[str, Any], parent: str | None):
    params = [Param(k, v) for k, v in record["params"].items()]
    tags = [RunTag(k, v) for k, v in record["tags"].items() if k not in _SKIPPED_TAGS]
    tags.append(RunTag(TAG_ARCHIVED_RUN_ID, record["run_id"]))
    if parent is not None:
        tags.append(RunTag(MLFLOW_PARENT_RUN_ID, parent))
    metrics = [
        Metric(key, value, int(timestamp), int(step))
        for key, points in record["metric_history"].items()
        for step, value, timestamp in points
    ]
    for chunk in chunks(params, MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=chunk)
    for chunk in chunks(tags, MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, tags=chunk)
    for chunk in chunks(metrics, MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=chunk)


def import_archive(
    archive_dir: str | Path,
    tracking_uri: str,
    experiment: str | None = None,
    artifact_location: str | None = None,
    optuna_storage: str | None = None,
) -> tuple[str, dict[str, str]]:
    """Recreate an archive's runs in a new experiment; returns its name and
    {archived run id: new run id}.

    The experiment must not exist yet (an import never merges into, or duplicates, runs).
    ``artifact_location``: the new experiment's artifact root (MLflow's default if None).
    ``optuna_storage``: also recreate the archived Optuna study there (it must not hold
    one of that name; an archive without one is an error).
    """
    archive = Path(archive_dir)
    document = read_archive(archive)
    name = experiment or document["experiment"]["name"]
    journal = archive / OPTUNA_JOURNAL
    client = MlflowClient(tracking_uri)
    if client.get_experiment_by_name(name) is not None:
        raise FileExistsError(
            f"experiment {name!r} exists at {tracking_uri}; import under another name "
            "(--experiment) or into another store"
        )
    if optuna_storage is not None:  # checked before anything is created
        if not journal.is_file():
            raise FileNotFoundError(
                f"{journal} not found: the archive holds no Optuna study (export it with "
                "--optuna-storage)"
            )
        check_study_absent(optuna_storage, journal_study_name(journal))
    experiment_id = client.create_experiment(
        name, artifact_location, tags=document["experiment"]["tags"]
    )
    records = document["runs"]
    by_old = {r["run_id"]: r for r in records}
    new_ids: dict[str, str] = {}

    def create(record: dict[str, Any]) -> str:
        if record["run_id"] in new_ids:
            return new_ids[record["run_id"]]
        old_parent = record["tags"].get(MLFLOW_PARENT_RUN_ID)
        parent = create(by_old[old_parent]) if old_parent in by_old else None
        run = client.create_run(
            experiment_id, start_time=record["start_time"], run_name=record["run_name"]
        )
        run_id = run.info.run_id
        _log_run(client, run_id, record, parent)
        for path in record["artifacts"]:
            parent_path = str(Path(path).parent)
            client.log_artifact(
                run_id,
                str(archive / ARTIFACTS_DIR / record["run_id"] / path),
                None if parent_path == "." else parent_path,
            )
        client.set_terminated(run_id, record["status"], end_time=record["end_time"])
        new_ids[record["run_id"]] = run_id
        return run_id

    for record in records:
        create(record)
    if optuna_storage is not None:
        try:
            import_study_journal(journal, optuna_storage, new_ids)
        except Exception as error:
            raise RuntimeError(
                f"the Optuna study was not imported ({type(error).__name__}: {error}); the "
                f"MLflow experiment {name!r} was: delete it (and `mlflow gc` it) or import "
                "under another --experiment name to try again"
            ) from error
    return name, new_ids
