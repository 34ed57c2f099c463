"""Whether a location is a URI or a path, and paths made absolute against a base folder.

One rule for every place that asks: a study's tracking and storage locations, the
CLI's tracking-store check and cluster warning, the Ray address, MLflow's artifact
root. A URI is ``scheme:/...`` or ``scheme://...`` with a scheme of at least two
characters, so ``C:/data`` (a Windows drive) and ``localhost:6379`` (a host and
port) are not URIs, while ``mlflow-artifacts:/path`` and ``ray://host:port`` are.
"""

from __future__ import annotations

import re
from pathlib import Path

# RFC 3986 scheme characters; one letter would be a Windows drive.
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+$")
_SQLITE_PREFIX = "sqlite:///"
#: Schemes of stores on the local file system (a database file or a folder).
LOCAL_SCHEMES = ("sqlite", "file")
#: Tracking stores that are servers with their own artifact store.
TRACKING_SERVER_SCHEMES = ("http", "https", "databricks")


def uri_scheme(text: str) -> str | None:
    """The lower-cased scheme of a URI (``"postgresql+psycopg2"``), None for a plain path."""
    head, sep, rest = text.partition(":")
    if sep and rest.startswith("/") and _SCHEME.match(head):
        return head.lower()
    return None


def is_uri(text: str) -> bool:
    """Whether ``text`` is a URI rather than a file system path (see the module docstring)."""
    return uri_scheme(text) is not None


def is_remote_uri(text: str) -> bool:
    """A URI of a store other processes can reach: not a local SQLite file or ``file:``."""
    scheme = uri_scheme(text)
    return scheme is not None and scheme.split("+", 1)[0] not in LOCAL_SCHEMES


def absolute_path(path: str, base: Path) -> str:
    """``path`` resolved against ``base`` (``~`` expanded); a URI unchanged."""
    if is_uri(path):
        return path
    return str((base / Path(path).expanduser()).resolve())


def absolute_store_uri(uri: str | None, base: Path, default_file: str) -> str:
    """A database URI with a relative SQLite file made absolute; other URIs unchanged.

    None means ``sqlite:///<base>/<default_file>``; a plain path is made absolute.
    """
    if uri is None:
        return f"{_SQLITE_PREFIX}{base / default_file}"
    if uri.startswith(_SQLITE_PREFIX):
        path = uri[len(_SQLITE_PREFIX) :]
        if path and path != ":memory:" and not Path(path).is_absolute():
            return f"{_SQLITE_PREFIX}{(base / path).resolve()}"
        return uri
    return absolute_path(uri, base)


def artifact_root(tracking_uri: str, artifact_location: str | None, base: Path) -> str | None:
    """A new experiment's artifact root: ``artifact_location`` made absolute, by default
    ``<base>/mlartifacts``, or None (the server's) for a tracking server: a local folder
    on the driver would be unreachable from trials on other nodes."""
    if artifact_location is None and uri_scheme(tracking_uri) in TRACKING_SERVER_SCHEMES:
        return None
    return absolute_path(artifact_location or "mlartifacts", base)


def sqlite_file(uri: str) -> str | None:
    """The database file of a ``sqlite:///PATH`` URI, None for any other URI."""
    return uri[len(_SQLITE_PREFIX) :] if uri.startswith(_SQLITE_PREFIX) else None


def is_local_reference(reference: str, base: Path) -> bool:
    """A pretrained-model reference that names a local folder rather than a hub id."""
    return reference.startswith((".", "/", "~")) or (base / reference).exists()
