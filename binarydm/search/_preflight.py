"""What a study checks before Ray starts, and the lock of a first contact with SQLite.

Bad input fails here with one clear line (the data root, a local teacher, the Ray
address, the MLflow server), before anything is written or any actor starts.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from binarydm.search._console import mask_secrets
from binarydm.spec import StudySpec, is_uri, sqlite_file


class StudyError(RuntimeError):
    """A study that cannot start or continue (the message says what to do)."""


def loopback_only() -> None:
    """Make the local cluster we start listen on 127.0.0.1 only.

    On Linux Ray replaces a loopback node IP by the machine's routable one and then its
    GCS, raylet, worker and agent servers listen on every interface. Its switch for
    "single-machine, loopback" (named for Windows and macOS, read once at import) keeps
    the node IP at 127.0.0.1, which every server then binds to. Token authentication
    stays on: ``ray.init`` enables it for new local clusters unless RAY_AUTH_MODE says
    otherwise.
    """
    from ray._private import ray_constants

    os.environ.setdefault(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, "0")
    if os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] == "0":
        ray_constants.ENABLE_RAY_CLUSTER = False


def check_reachable(address: str, timeout_s: float) -> None:
    """Ray's own connect retries for minutes; answer within ``timeout_s`` instead."""
    import socket
    from urllib.parse import urlparse

    if address == "auto":
        return
    parsed = urlparse(address if is_uri(address) else f"ray://{address}")
    host, port = parsed.hostname, parsed.port
    if host is None or port is None:
        raise StudyError(f"--address={address!r} is invalid: expected HOST:PORT or ray://HOST:PORT")
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise StudyError(
            f"--address={address!r} does not answer ({exc}); start the head with "
            "`ray start --head` or leave --address out for a local cluster"
        ) from None


def preflight(spec: StudySpec, cache_dir: str, address: str | None) -> list[str]:
    """Fail in seconds, before Ray starts or anything is written, on what would fail late;
    returns what was checked (the data and a given teacher only where the space does not
    vary them, a cluster and an MLflow server only where given)."""
    checked = []
    if address:
        check_reachable(address, timeout_s=30.0)
        checked.append("the Ray cluster")
    if _check_tracking_reachable(spec.tracking.uri):
        checked.append("the MLflow server")
    check_mlflow_schema(spec.tracking.uri)
    settings = spec.trial_settings({}, spec.search.seeds[0])
    space = list(spec.search.space)
    if not any(k.startswith("data.") for k in space):
        _check_data(settings, cache_dir)
        checked.append("the data")
    pretrained = settings.teacher.pretrained
    if pretrained and not any(k.startswith("teacher.") for k in space):
        _check_teacher(pretrained)
        checked.append("the teacher")
    return checked


def check_mlflow_schema(uri: str) -> None:
    """Refuse, in one line, a SQLite MLflow store whose schema is newer than this MLflow's.

    MLflow's own error for it ("out-of-date database schema ... run 'mlflow db upgrade'")
    points the wrong way: the store is ahead of the installed MLflow (a GPU machine's
    newer MLflow wrote it), and no upgrade here can read it. Nothing is written. Files
    that are not MLflow stores (an Optuna database has an alembic_version table too) are
    left to MLflow to report.
    """
    import sqlite3

    database = sqlite_file(uri) if uri else None
    if database is None or not Path(database).is_file():
        return
    try:
        read_only = f"{Path(database).resolve().as_uri()}?mode=ro"
        with contextlib.closing(sqlite3.connect(read_only, uri=True)) as db:
            tables = {row[0] for row in db.execute("select name from sqlite_master")}
            if not {"alembic_version", "experiments", "runs"} <= tables:
                return
            rows = db.execute("select version_num from alembic_version").fetchall()
    except sqlite3.Error:
        return  # unreadable here: MLflow reports it
    known = _mlflow_schema_revisions()
    if not rows or known is None or rows[0][0] in known:
        return
    import mlflow

    raise StudyError(
        f"the MLflow store {database} was written by a newer MLflow (schema revision "
        f"{rows[0][0]}, unknown to MLflow {mlflow.__version__} here): read it with that "
        "MLflow's version (pip install 'mlflow==VERSION'), or export it on the machine that "
        "wrote it (bdm-search export); the store is left as it is"
    )


def _mlflow_schema_revisions() -> set[str] | None:
    """Every schema revision the installed MLflow's migrations know (None: not readable
    here, e.g. an MLflow without alembic; then MLflow's own check stands)."""
    try:
        from alembic.script import ScriptDirectory
        from mlflow.store.db.utils import _get_alembic_config
    except ImportError:
        return None

    script = ScriptDirectory.from_config(_get_alembic_config("sqlite://"))
    return {revision.revision for revision in script.walk_revisions()}


def _check_data(settings, cache_dir: str) -> None:
    from binarydm.data import DatasetError
    from binarydm.train import dataset_sha256

    data = settings.data
    if data.root is not None and not Path(data.root).expanduser().is_dir():
        raise StudyError(
            f"data.root={data.root!r} is invalid: no such folder; allowed: a folder holding "
            "the datasets, or unset ($BINARYDM_DATA_ROOT, ./data or ../shared/data)"
        )
    try:
        dataset_sha256(settings, data.root, cache_dir)
    except DatasetError as exc:
        key, value = ("data.path", data.path) if data.path else ("data.source", data.source)
        detail = " ".join(str(exc).split())  # download errors span lines; the CLI prints one
        raise StudyError(
            f"{key}={value!r} is invalid: {detail}; allowed: an existing dataset "
            "(a .npz file or image folder for data.path, or a source under data.root)"
        ) from None


def _check_teacher(pretrained: str) -> None:
    from binarydm.models import load_unet

    if pretrained.startswith(("/", ".", "~")) and not Path(pretrained).expanduser().is_dir():
        raise StudyError(
            f"teacher.pretrained={pretrained!r} is invalid: no such folder; allowed: a folder "
            "written by save_pretrained (with config.json) or a Hugging Face hub id"
        )
    if Path(pretrained).expanduser().is_dir():
        load_unet(pretrained)  # ModelLoadError: one line saying what is wrong with it


def _check_tracking_reachable(uri: str, timeout_s: float = 5.0) -> bool:
    """An MLflow server must answer at the start: run creation cannot be buffered.
    Returns whether ``uri`` is a server (a file store needs no check)."""
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https") or parsed.hostname is None:
        return False
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise StudyError(
            f"tracking.uri={mask_secrets(uri)!r} does not answer ({exc}); start the MLflow "
            "server (mlflow server --host 127.0.0.1 --port PORT) or use a sqlite:/// URI"
        ) from None
    return True


@contextlib.contextmanager
def sqlite_init_lock(uri: str):
    """Serialize the first contact of drivers with one SQLite store.

    Two drivers that create the same MLflow (or Optuna) SQLite database at once race in
    its schema migration, and the loser dies with an Alembic error; a file lock makes the
    second one wait and find the schema there. The lock lives in the cache folder, named
    by the database's path, not beside the database: a lock file stays after its release
    (deleting it would let a third driver lock a new file while a second holds the old
    one), and the user's folder must hold nothing but the stores, whatever the exit.
    """
    database = sqlite_file(uri)
    if database is None:
        yield
        return
    from filelock import FileLock

    with FileLock(str(sqlite_lock_path(database))):
        yield


def sqlite_lock_path(database: str) -> Path:
    """Where ``sqlite_init_lock`` locks ``database`` (one file per database path)."""
    import hashlib

    from binarydm.data import cache_dir

    key = hashlib.sha256(str(Path(database).resolve()).encode()).hexdigest()[:16]
    folder = cache_dir(None) / "locks"
    folder.mkdir(exist_ok=True)
    return folder / f"{Path(database).name}-{key}.lock"
