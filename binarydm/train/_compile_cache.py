"""Compiled graphs carried between machines: torch's cache artifacts ("mega-cache") as files.

Trials on one machine already share inductor's on-disk cache, so a trial compiling a graph
another has compiled starts warm (20 s instead of 212 s for a BinaryDM W1A4 step of
``ddpm-cifar10`` on an H200, benchmarks/results/gpu_perf.md). A fresh machine starts cold.
With ``training.compile_cache`` on (the default) a compiling trial first hot-loads every
``*.megacache`` file under ``<cache_dir>/compile`` (``torch.compiler.load_cache_artifacts``)
and, after its first compiled step and again after its last, writes what its process
compiled (``save_cache_artifacts``) there: copy or mount that folder with the rest of the cache dir
and a new machine's first trial starts warm too (21.7 s on the H200 with
``benchmarks/compile_cost.py --load-artifacts``, the same calls).

Each file holds what its process compiled (or hit) since its last save: the record of
torch's artifacts is cleared after loading and after every save. Without that a file would
repeat the bytes of every earlier save of its process (a reused actor's earlier trials
too), while loading it restores only the last save's (torch 2.14 keeps the last chunk of
each kind). A file is named by the cache keys it holds, so trials of the same graphs write
one file. The folder grows by a file per new set of graphs (157 MB for a BinaryDM trial of
``ddpm-cifar10``) up to ``$BINARYDM_COMPILE_CACHE_MAX_MIB`` (default 4096): past it, a
save removes the least recently used files (loading a file marks it used), never the one
it wrote. Delete the folder to start over. The files are pickled compiled code: load only
your own, from the same torch, Triton and GPU architecture. A file that cannot be read is
skipped with a warning, and a save that fails (a read-only or full disk) is reported and
dropped: the cache only ever saves time, it never fails a trial.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SUFFIX = ".megacache"
FOLDER = "compile"
#: The folder's size bound in MiB (the environment of the trial that saves).
MAX_MIB_ENV = "BINARYDM_COMPILE_CACHE_MAX_MIB"
DEFAULT_MAX_MIB = 4096.0


def cache_folder(cache_dir: str | os.PathLike[str]) -> Path:
    """Where a cache dir keeps its compile artifacts."""
    return Path(cache_dir) / FOLDER


def max_folder_bytes() -> int:
    """The folder's size bound: ``$BINARYDM_COMPILE_CACHE_MAX_MIB`` (a finite number of MiB,
    at least 0), else the default; a value that is not one is reported and the default used."""
    text = os.environ.get(MAX_MIB_ENV)
    try:
        mib = DEFAULT_MAX_MIB if text is None else float(text)
        if not (math.isfinite(mib) and mib >= 0):
            raise ValueError
    except ValueError:
        log.warning("%s=%r is not a finite number of MiB >= 0: %s used", MAX_MIB_ENV, text,
                    DEFAULT_MAX_MIB)  # fmt: skip
        mib = DEFAULT_MAX_MIB
    return int(mib * 2**20)


def evict_least_recent(folder: str | os.PathLike[str], limit: int, keep: Path) -> list[Path]:
    """Remove the least recently used artifact files of ``folder`` (oldest mtime first)
    until it holds at most ``limit`` bytes of them, never ``keep``; returns those removed."""
    files = []
    for path in Path(folder).glob(f"*{SUFFIX}"):
        try:
            stat = path.stat()
        except OSError:  # removed meanwhile by another trial's save
            continue
        files.append((stat.st_mtime, stat.st_size, path))
    total = sum(size for _, size, _ in files)
    removed = []
    for _, size, path in sorted(files):
        if total <= limit:
            break
        if path == keep:
            continue
        path.unlink(missing_ok=True)
        total -= size
        removed.append(path)
        log.info("compile cache: removed %s (least recently used; bound %d bytes)", path, limit)
    return removed


def _forget_recorded_artifacts() -> None:
    """Start torch's record of this process's cache artifacts afresh (see the module doc).
    A private API: where a torch version lacks it, files only grow larger."""
    manager = getattr(getattr(torch.compiler, "_cache", None), "CacheArtifactManager", None)
    if manager is not None and hasattr(manager, "clear"):
        manager.clear()


def load_compile_cache(folder: str | os.PathLike[str]) -> dict[str, float | int]:
    """Hot-load every artifact file in ``folder`` into this process's compile caches.

    Returns what was loaded: ``files``, ``entries`` (cache entries in them), ``skipped``
    (unreadable files) and ``load_s``."""
    started = time.perf_counter()
    files = entries = skipped = 0
    for path in sorted(Path(folder).glob(f"*{SUFFIX}")):
        try:
            # torch answers None for bytes it cannot read (after logging why); it may
            # also raise, e.g. for a file from another torch version.
            info = torch.compiler.load_cache_artifacts(path.read_bytes())
            problem = None if info is not None else "not readable as cache artifacts"
        except Exception as error:  # any unreadable file: compile without it
            info, problem = None, f"{type(error).__name__}: {error}"
        if problem is not None:
            log.warning("compile cache %s skipped: %s", path, problem)
            skipped += 1
            continue
        files += 1
        entries += sum(len(keys) for keys in info.artifacts.values())
        with contextlib.suppress(OSError):  # used now: the last a bound would remove
            os.utime(path)
    _forget_recorded_artifacts()  # what was loaded is in the folder already
    return {
        "files": files,
        "entries": entries,
        "skipped": skipped,
        "load_s": time.perf_counter() - started,
    }


def save_compile_cache(folder: str | os.PathLike[str]) -> Path | None:
    """Write what this process compiled since it loaded or last saved to ``folder``; the
    file, or None when there was nothing new (an eager-only backend, every graph loaded),
    a file of the same keys exists, or the write failed (logged)."""
    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is None:
        return None
    _forget_recorded_artifacts()
    blob, info = artifacts
    keys = sorted(f"{kind}:{key}" for kind, found in info.artifacts.items() for key in found)
    name = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:24] + SUFFIX
    path = Path(folder) / name
    if path.exists():
        return None
    partial = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written beside, then renamed: a trial on another node never reads half a file
        # (a unique name: pids repeat across the containers of a shared folder).
        handle, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{name}.", suffix=".partial")
        os.fchmod(handle, 0o644)  # mkstemp's 0600 would hide it from a shared folder's users
        with os.fdopen(handle, "wb") as stream:
            stream.write(blob)
        os.replace(partial, path)
        partial = None
    except OSError as error:
        log.warning("compile cache not saved to %s: %s", path, error)
        return None
    finally:
        if partial is not None:
            Path(partial).unlink(missing_ok=True)
    try:
        evict_least_recent(folder, max_folder_bytes(), keep=path)
    except OSError as error:  # another user's file in a shared folder, say: keep going
        log.warning("compile cache %s not bounded: %s", folder, error)
    return path
