"""The FP reference of a study: its teacher, scored once exactly as the trials are.

A trial's FID says little alone; beside the FID of the FP model it was distilled
from, under the same sampler, steps, sample count, FID features, reference images,
autocast and seed, it says what binarization cost (``fid_ratio_to_fp``).
``start_reference`` (the driver calls it before Ray Tune starts) gives the study
exactly one reference run (tag ``bdm.role=reference``, run name ``fp-reference``,
under the parent run), found by its ``reference_key``:

- the study already has a FINISHED one with the key (a resumed study): kept, nothing
  evaluated;
- a FINISHED reference run with the key is in any experiment of the tracking store (a
  later study with the same teacher and settings): its params, metrics and sample grid
  are copied, tag ``reused_from``;
- else a Ray task that reserves one trial worker's resources evaluates the teacher with
  ``binarydm.train._evaluate.evaluate`` while the first trials run, and
  ``finish_reference`` (after ``tuner.fit()``) logs what it returned.

A reference run of another key, or one that did not finish, is taken out of the study
(``bdm.role=reference-replaced``), not deleted. A failing reference never fails the
study: its run ends FAILED with tag ``error`` and the study has no FP point. A space
that searches what the FP scores depend on (data, teacher, evaluation) has no single
reference and gets none.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import tempfile
import traceback
from pathlib import Path
from typing import Any

from binarydm.metric_contract import once_under_comparability_names
from binarydm.train.settings import TrialSettings

log = logging.getLogger(__name__)

#: Bump when what a key's scores mean changes (evaluate() itself, what the key holds).
KEY_VERSION = 1
#: Parent-run tag: the reference run's id, or why the study has no FP point.
TAG_FP_REFERENCE = "fp_reference"
#: Searched keys that make the trials' FP reference differ from trial to trial.
PER_TRIAL_PREFIXES = ("data.", "teacher.", "evaluation.")
PER_TRIAL_KEYS = ("training.num_train_timesteps", "workers.use_gpu")
GRID_NAME = "samples.png"


@dataclasses.dataclass(frozen=True)
class PendingReference:
    """An evaluation launched by ``start_reference`` that ``finish_reference`` collects."""

    run_id: str
    task: Any  # ray.ObjectRef of evaluate_teacher's result


def device_kind(settings: TrialSettings) -> str:
    """Where trials evaluate: evaluate() autocasts to bf16 on cuda, so scores differ by it."""
    return "cuda" if settings.workers.use_gpu else "cpu"


def reference_identity(
    settings: TrialSettings, teacher_sha256: str, data_sha256: str
) -> dict[str, Any]:
    """Everything the FP scores depend on, as the JSON the key hashes.

    ``data_sha256``: ``evaluation_data_sha256`` of the images evaluate() reads. The seed is
    ``settings.seed``: the trials' sampling seed (the study's first seed).
    """
    data = settings.data
    return {
        "version": KEY_VERSION,
        "teacher_sha256": teacher_sha256,
        "data": {
            "source": data.source,
            "path": data.path,
            "resolution": data.resolution,
            "channels": data.channels,
            "sha256": data_sha256,
        },
        "evaluation": dataclasses.asdict(settings.evaluation),
        "num_train_timesteps": settings.training.num_train_timesteps,
        "seed": settings.seed,
        "device": device_kind(settings),
    }


def reference_key(settings: TrialSettings, teacher_sha256: str, data_sha256: str) -> str:
    """sha256 (hex) of ``reference_identity``: equal keys, interchangeable FP scores."""
    identity = reference_identity(settings, teacher_sha256, data_sha256)
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def evaluation_data_sha256(settings: TrialSettings, data_root=None, cache_dir=None) -> str:
    """sha256 of the images evaluate() reads: the held-out test images, the FID reference.

    ``data.train_limit`` is left out on purpose: evaluate() never reads that subset.
    """
    from binarydm.data import load_split

    data, evaluation = settings.data, settings.evaluation
    digest = hashlib.sha256()
    reads = (
        ("test", evaluation.test_loss_images),
        (evaluation.reference_split, evaluation.fid_samples),
    )
    for split, count in reads:
        loaded = load_split(
            data.source, split, data_root=data_root, cache_dir=cache_dir, limit=count,
            path=data.path, image_size=data.resolution,
        )  # fmt: skip
        digest.update(f"{split}:{count}:{loaded.sha256};".encode())
    return digest.hexdigest()


def per_trial_keys(spec) -> list[str]:
    """Searched keys under which trials are scored on different terms (no single reference)."""
    return [
        key
        for key in spec.search.space
        if key.startswith(PER_TRIAL_PREFIXES) or key in PER_TRIAL_KEYS
    ]


def reference_params(
    settings: TrialSettings, teacher_dir: str, teacher_sha256: str, data_sha256: str
) -> dict[str, Any]:
    """The settings a reference run logs before it is scored (evaluate() adds the rest)."""
    data = settings.data
    evaluation = {f"evaluation.{k}": v for k, v in dataclasses.asdict(settings.evaluation).items()}
    return {
        **once_under_comparability_names(evaluation),
        "data.source": data.source,
        "data.path": data.path,
        "data.resolution": data.resolution,
        "data.channels": data.channels,
        "data.eval_sha256": data_sha256,
        "training.num_train_timesteps": settings.training.num_train_timesteps,
        "seed": settings.seed,
        "device": device_kind(settings),
        "teacher.dir": teacher_dir,
        "teacher.sha256": teacher_sha256,
    }


def start_reference(spec, tracker, teacher_dir: str | None, cache_dir: str):
    """Make sure the study has its one reference run; returns the evaluation to collect
    with ``finish_reference`` (a ``PendingReference``), or None when nothing is left to do.

    ``spec``: the study with resolved paths; ``teacher_dir``: the shared teacher the
    trials distil (None when the space changes it per trial). Never raises for the
    reference's own sake: a failure is a FAILED run (or a warning) and the study goes on.
    """
    try:
        return _start_reference(spec, tracker, teacher_dir, cache_dir)
    except Exception as exc:  # the tracking store refused the bookkeeping itself
        log.warning("no FP reference run: %s", _one_line(exc))
        return None


def _start_reference(spec, tracker, teacher_dir: str | None, cache_dir: str):
    from binarydm.models import weights_sha256

    parent = tracker.parent_run_id()
    if not spec.search.fp_reference:
        tracker.set_tags(parent, {TAG_FP_REFERENCE: "none: search.fp_reference is false"})
        return None
    searched = per_trial_keys(spec)
    if searched or teacher_dir is None:
        reason = (
            f"the space searches {', '.join(searched)}, so trials differ in what the FP "
            "teacher would be scored on"
            if searched
            else "the study has no shared teacher"
        )
        # A warning, so that it shows: the study will have no FP point, as its file asks.
        log.warning("no FP reference run: %s", reason)
        tracker.set_tags(parent, {TAG_FP_REFERENCE: f"none: {reason}"})
        return None
    settings = spec.trial_settings({}, spec.search.seeds[0])  # exactly a trial's evaluation
    try:
        teacher_sha256 = weights_sha256(teacher_dir)
        data_sha256 = evaluation_data_sha256(settings, settings.data.root, cache_dir)
    except Exception as exc:  # model, dataset and file errors share no base class
        log.warning("no FP reference run: its key cannot be computed: %s", _one_line(exc))
        tracker.set_tags(parent, {TAG_FP_REFERENCE: f"none: {_one_line(exc)}"})
        return None
    key = reference_key(settings, teacher_sha256, data_sha256)
    previous = tracker.reference_runs()
    kept = _finished_with_key(previous, key)
    if kept is not None:  # a resumed study: scored already
        _replace(tracker, [r for r in previous if r.info.run_id != kept], kept)
        tracker.set_tags(parent, {TAG_FP_REFERENCE: kept})
        return None
    run_id = tracker.create_reference_run(key)
    _replace(tracker, previous, run_id)
    tracker.set_tags(parent, {TAG_FP_REFERENCE: run_id})
    try:
        tracker.log_params(
            run_id, reference_params(settings, str(teacher_dir), teacher_sha256, data_sha256)
        )
        source = next(
            (r for r in tracker.finished_reference_runs(key) if r.info.run_id != run_id), None
        )
        if source is not None:
            copy_reference(tracker, source, run_id)
            return None
        return PendingReference(run_id, launch_evaluation(settings, str(teacher_dir), cache_dir))
    except Exception as exc:
        fail_reference(tracker, run_id, exc)
        return None


def finish_reference(tracker, pending: PendingReference | None) -> dict[str, Any] | None:
    """Wait for a launched evaluation and log it; returns its metrics, or None when there
    was none or it failed (then its run is FAILED with tag ``error``, and a warning says so).
    """
    if pending is None:
        return None
    import ray

    try:
        result = ray.get(pending.task)
        log_evaluation(tracker, pending.run_id, result)
    except Exception as exc:  # the task's error (RayTaskError), a dead worker, MLflow
        fail_reference(tracker, pending.run_id, exc)
        return None
    return result["metrics"]


def launch_evaluation(settings: TrialSettings, teacher_dir: str, cache_dir: str):
    """``evaluate_teacher`` as a Ray task holding one trial worker's CPUs (and GPUs), so a
    GPU study scores its teacher on a GPU, as its trials are scored."""
    import ray

    workers = settings.workers
    task = ray.remote(evaluate_teacher).options(
        name="fp-reference",
        num_cpus=workers.cpus_per_worker,
        num_gpus=workers.gpus_per_worker if workers.use_gpu else 0,
        max_retries=0,  # a failure is recorded and the study goes on; a retry would hold a GPU
    )
    return task.remote(teacher_dir, settings, settings.data.root, cache_dir)


def evaluate_teacher(
    teacher_dir: str, settings: TrialSettings, data_root: str | None, cache_dir: str
) -> dict[str, Any]:
    """In the Ray task: the teacher's evaluate() metrics, its sample grid, the environment."""
    from binarydm.models import load_unet
    from binarydm.tracking import reproducibility_params
    from binarydm.train import evaluate, inline_device

    device = inline_device(settings.workers.use_gpu)  # the device a trial's worker gets
    model = load_unet(teacher_dir).to(device)
    with tempfile.TemporaryDirectory(prefix="bdm-fp-reference-") as out:
        metrics = evaluate(model, settings, Path(out), data_root=data_root, cache_dir=cache_dir)
        grid = (Path(out) / GRID_NAME).read_bytes()
    return {"metrics": metrics, "environment": reproducibility_params(), "grid_png": grid}


def log_evaluation(tracker, run_id: str, result: dict[str, Any]) -> None:
    """Log what ``evaluate_teacher`` returned on the reference run and end it FINISHED."""
    from binarydm.metric_contract import COMPARABILITY

    metrics = result["metrics"]
    # As on trials: the FID's comparability settings are params, the numeric rest metrics.
    tracker.log_params(run_id, {k: metrics[k] for k in COMPARABILITY if k in metrics})
    tracker.log_params(run_id, result["environment"])
    numeric = {
        k: v
        for k, v in metrics.items()
        if k not in COMPARABILITY and isinstance(v, int | float) and not isinstance(v, bool)
    }
    tracker.log_metrics(run_id, numeric)
    with tempfile.TemporaryDirectory() as tmp:
        grid = Path(tmp) / GRID_NAME
        grid.write_bytes(result["grid_png"])
        tracker.log_artifact_file(run_id, grid)
    tracker.client.set_terminated(run_id, status="FINISHED")


def copy_reference(tracker, source, run_id: str) -> None:
    """Give ``run_id`` the scores of the FINISHED reference run ``source`` (same key)."""
    from mlflow.exceptions import MlflowException

    from binarydm.tracking import TAG_REUSED_FROM

    own = tracker.client.get_run(run_id).data.params
    # This study's own settings stay (its teacher folder may live elsewhere); the rest
    # (comparability params, the environment that scored it) come from the source.
    tracker.log_params(run_id, {k: v for k, v in source.data.params.items() if k not in own})
    tracker.log_metrics(run_id, dict(source.data.metrics))
    with tempfile.TemporaryDirectory() as tmp:
        try:
            grid = tracker.client.download_artifacts(source.info.run_id, GRID_NAME, tmp)
        except (MlflowException, OSError):
            grid = None  # scores without a grid are still the scores
        if grid is not None:
            tracker.log_artifact_file(run_id, grid)
    tracker.set_tags(run_id, {TAG_REUSED_FROM: source.info.run_id})
    tracker.client.set_terminated(run_id, status="FINISHED")
    log.info("FP reference of study %s reused from run %s", tracker.study, source.info.run_id)


def fail_reference(tracker, run_id: str, exc: BaseException) -> None:
    """End the reference run FAILED with the error (its tail) in tag ``error``; warn."""
    from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

    from binarydm.tracking import TAG_ERROR, truncate

    log.warning(
        "FP reference evaluation failed (run %s); the study goes on without an FP point: %s",
        run_id, _one_line(exc),
    )  # fmt: skip
    text = "".join(traceback.format_exception(exc))
    try:
        tracker.client.set_tag(run_id, TAG_ERROR, truncate(text, MAX_TAG_VAL_LENGTH, keep="tail"))
        tracker.client.set_terminated(run_id, status="FAILED")
    except Exception as again:  # MLflow itself is down: the warning above is what is left
        log.warning("could not mark FP reference run %s FAILED: %s", run_id, _one_line(again))


def _finished_with_key(runs, key: str) -> str | None:
    from binarydm.tracking import TAG_REFERENCE_KEY, oldest_run

    done = [
        r for r in runs if r.info.status == "FINISHED" and r.data.tags.get(TAG_REFERENCE_KEY) == key
    ]
    return oldest_run(done).info.run_id if done else None


def _replace(tracker, runs, replaced_by: str) -> None:
    for run in runs:
        tracker.replace_reference_run(run.info.run_id, replaced_by)
        log.info("FP reference run %s replaced by %s", run.info.run_id, replaced_by)


def _one_line(exc: BaseException) -> str:
    from binarydm.search._trainable import error_line

    return error_line(exc)
