"""A study's Optuna trials as a text file in a run archive, and back into a storage.

The MLflow runs of an archive (``_archive``) are enough to browse a study; continuing
it on another machine (``bdm-search STUDY --resume``) also needs its Optuna study: the
sampler's history, each trial's number, params, distributions, state and values. Its
SQLite file is a store, not a record to commit, so an archive carries the study as an
Optuna journal (``JournalStorage``'s JSON lines, one operation a line), written and
read by Optuna itself. Importing gives every trial's ``mlflow_run_id`` user attribute
the id of its run in the new MLflow store, and keeps trial numbers, which are the
MLflow runs' ``trial_id`` tags.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

#: The file of an archive (beside ``runs.json``) holding its Optuna study.
OPTUNA_JOURNAL = "optuna.jsonl"
#: Trial user attribute naming the trial's MLflow run (set by ``binarydm.search._trainable``).
MLFLOW_RUN_ATTR = "mlflow_run_id"


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Without Optuna's "A new study created in ..." lines: the command says what it did."""
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)


def _journal(path: Path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(path)))


def check_study_present(storage: str, study_name: str) -> None:
    """Refuse (``LookupError``) a storage that lacks Optuna study ``study_name``."""
    import optuna

    if study_name not in optuna.get_all_study_names(storage):
        raise LookupError(f"no Optuna study named {study_name!r} in {storage}")


def export_study_journal(storage: str, study_name: str, out_dir: str | Path) -> int:
    """Write Optuna study ``study_name`` of ``storage`` (``check_study_present`` first) to
    ``out_dir/optuna.jsonl``; returns its number of trials."""
    import optuna

    target = Path(out_dir) / OPTUNA_JOURNAL
    if target.exists():
        raise FileExistsError(f"{target} exists; export into an empty folder")
    source = optuna.load_study(study_name=study_name, storage=storage)
    # Written aside and moved in: the journal's lock file stays out of the archive.
    with tempfile.TemporaryDirectory() as scratch, _quiet_optuna():
        journal = Path(scratch) / OPTUNA_JOURNAL
        optuna.copy_study(from_study_name=study_name, from_storage=source._storage,
                          to_storage=_journal(journal))  # fmt: skip
        shutil.move(journal, target)
    return len(source.trials)


def check_study_absent(storage: str, study_name: str) -> None:
    """Refuse (``FileExistsError``) a storage that already holds ``study_name``."""
    import optuna

    if study_name in optuna.get_all_study_names(storage):
        raise FileExistsError(
            f"Optuna study {study_name!r} exists in {storage}; import into another storage"
        )


def journal_study_name(journal: str | Path) -> str:
    """The name of the one Optuna study an archive's journal holds."""
    import optuna

    names = optuna.get_all_study_names(_journal(Path(journal)))
    if len(names) != 1:
        raise ValueError(f"{journal} holds {len(names)} Optuna studies; an archive holds one")
    return names[0]


def import_study_journal(journal: str | Path, storage: str, run_ids: dict[str, str]) -> int:
    """Recreate the journal's study in ``storage`` (which must not hold it: Optuna refuses,
    ``check_study_absent`` says so first); every trial's ``mlflow_run_id`` becomes
    ``run_ids[old id]``. Returns the number of trials. A failure part way deletes the
    partial study again (then raises)."""
    import optuna

    name = journal_study_name(journal)
    source = optuna.load_study(study_name=name, storage=_journal(Path(journal)))
    with _quiet_optuna():
        target = optuna.create_study(
            study_name=source.study_name, storage=storage, directions=source.directions
        )
    try:
        _copy_into(source, target, run_ids)
    except BaseException:
        optuna.delete_study(study_name=name, storage=storage)
        raise
    return len(source.trials)


def _copy_into(source, target, run_ids: dict[str, str]) -> None:
    """``optuna.copy_study``'s steps, each trial's run id remapped on the way in: a
    finished trial's user attributes cannot be changed once it is stored."""
    system_attrs = source._storage.get_study_system_attrs(source._study_id)
    for key, value in system_attrs.items():  # the metric names live here
        target._storage.set_study_system_attr(target._study_id, key, value)
    for key, value in source.user_attrs.items():
        target.set_user_attr(key, value)
    for trial in source.get_trials(deepcopy=False):
        moved = copy.deepcopy(trial)
        old = trial.user_attrs.get(MLFLOW_RUN_ATTR)
        if old is not None:
            moved.set_user_attr(MLFLOW_RUN_ATTR, run_ids.get(old, old))
        trial_id = target._storage.create_new_trial(target._study_id, template_trial=moved)
        number = target._storage.get_trial_number_from_id(trial_id)
        if number != trial.number:  # the MLflow runs name their trial by number
            raise RuntimeError(f"trial {trial.number} was recreated as number {number}")
