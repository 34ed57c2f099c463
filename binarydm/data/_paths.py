"""Where datasets are read from and where derived arrays are cached, plus the one data error.

The data root may be read-only (e.g. a shared mount of the offline copies), so
everything this package writes goes to a separate cache directory, always
through an atomic replace so that a crash never leaves a half-written file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np

DATA_ROOT_ENV = "BINARYDM_DATA_ROOT"
CACHE_DIR_ENV = "BINARYDM_CACHE_DIR"
OFFLINE_ENV = "BINARYDM_OFFLINE"
DEFAULT_DATA_ROOTS = ("data", "../shared/data")
DEFAULT_CACHE_DIR = "~/.cache/binarydm"


class DatasetError(ValueError):
    """A dataset is missing or malformed; the message names the path tried and how to get it."""


def how_to_get_data(filename: str) -> str:
    """The remedy every "missing dataset" message ends with."""
    return (
        f"Get the data: run once with network access (torchvision downloads it into the cache "
        f"dir, see {CACHE_DIR_ENV}), or set {DATA_ROOT_ENV} to a folder containing {filename}."
    )


def find_data_root(explicit: str | os.PathLike | None = None) -> Path | None:
    """The data root if one is configured or found, else None (callers may then download).

    An explicit argument or ``BINARYDM_DATA_ROOT`` that does not exist is an error rather
    than a silent fallback: the user asked for that folder.
    """
    chosen = explicit if explicit is not None else os.environ.get(DATA_ROOT_ENV) or None
    if chosen is not None:
        root = Path(chosen).expanduser().resolve()
        if not root.is_dir():
            origin = "data.root" if explicit is not None else DATA_ROOT_ENV
            raise DatasetError(f"data root {root} (from {origin}) is not a directory")
        return root
    for candidate in DEFAULT_DATA_ROOTS:
        root = Path(candidate).resolve()
        if root.is_dir():
            return root
    return None


def data_root(explicit: str | os.PathLike | None = None) -> Path:
    """Absolute data root: ``explicit``, else ``$BINARYDM_DATA_ROOT``, else the first existing
    of ./data and ../shared/data (relative to the current working directory).
    """
    root = find_data_root(explicit)
    if root is None:
        tried = ", ".join(str(Path(c).resolve()) for c in DEFAULT_DATA_ROOTS)
        raise DatasetError(
            f"no data root: {DATA_ROOT_ENV} is unset and none of {tried} exists; "
            f"set {DATA_ROOT_ENV} or pass data_root"
        )
    return root


def cache_dir(explicit: str | os.PathLike | None = None) -> Path:
    """Absolute, created, writable cache dir: ``explicit``, else ``$BINARYDM_CACHE_DIR``, else
    ``~/.cache/binarydm``."""
    chosen = explicit if explicit is not None else os.environ.get(CACHE_DIR_ENV)
    chosen = chosen or DEFAULT_CACHE_DIR
    path = Path(chosen).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def download_allowed(download: bool | None) -> bool:
    """``download`` if given, else True unless ``BINARYDM_OFFLINE`` is set (fail fast offline)."""
    if download is not None:
        return download
    return os.environ.get(OFFLINE_ENV, "").lower() not in ("1", "true", "yes")


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` via a temporary file in the same folder and ``os.replace``.

    Concurrent writers (several Ray workers decoding at once) each replace the file with
    identical bytes, and readers never see a partial file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, array, allow_pickle=False)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
