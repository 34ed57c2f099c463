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

A file is named by the cache keys it holds, so trials of the same graphs write one file
and a process whose keys all came from files already there writes nothing. A file that
cannot be read (truncated, from another torch) is skipped with a warning, and the trial
compiles as it would without it: the cache only ever saves time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SUFFIX = ".megacache"
FOLDER = "compile"


def cache_folder(cache_dir: str | os.PathLike[str]) -> Path:
    """Where a cache dir keeps its compile artifacts."""
    return Path(cache_dir) / FOLDER


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
    return {
        "files": files,
        "entries": entries,
        "skipped": skipped,
        "load_s": time.perf_counter() - started,
    }


def save_compile_cache(folder: str | os.PathLike[str]) -> Path | None:
    """Write this process's compile artifacts to ``folder``; the file, or None when there
    was nothing to save (an eager-only backend) or a file of the same keys exists."""
    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is None:
        return None
    blob, info = artifacts
    keys = sorted(f"{kind}:{key}" for kind, found in info.artifacts.items() for key in found)
    name = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:24] + SUFFIX
    path = Path(folder) / name
    if path.exists():
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside, then renamed: a trial on another node never reads half a file.
    partial = path.with_name(f".{name}.{os.getpid()}.partial")
    partial.write_bytes(blob)
    partial.replace(path)
    return path
